"""The toy "probe": the FID recipe with a small attribute classifier in place of Inception.

A small CNN reads all five scene attributes of a 32x32 toy-world image (one linear head per attribute on
a shared 128-d penultimate feature layer). Its features play the role of Inception's pool3 features:
`probe_fd` fits a gaussian (mean, covariance) to the features of two image sets and returns the Frechet
distance between them. The probe is trained on freshly rendered, lightly degraded images (small blur,
noise and colour jitter, never enough to change an attribute) so that it reads the slightly blurry or
noisy images a generative model makes as well as clean renders.

The shipped probe lives in assets/probe (probe.safetensors + probe.json with its config and measured
accuracies); `load_probe()` loads it offline. Retrain with:
    OMP_NUM_THREADS=1 python -m lcmkit.toy.probe --steps 600  (about 4 min on 1 CPU thread)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lcmkit.measure.eval import feature_stats, frechet_distance
from lcmkit.toy.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    render_array,
    sample_scenes,
    sample_seed,
)

ASSET_DIR = Path(__file__).parent / "assets" / "probe"
WEIGHTS_NAME = "probe.safetensors"
CONFIG_NAME = "probe.json"

# Attribute values in head order (index i of head `name` is ATTRIBUTE_VALUES[name][i]).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES),
    "colour": tuple(COLOURS),
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
}
DEFAULT_ARCH: dict[str, Any] = {"channels": [32, 64, 64, 32], "feature_dim": 128}
# Light degradations of training images, in [0, 1] pixel units (blur sigma in 32 px pixels).
DEFAULT_AUGMENT: dict[str, float] = {
    "p_clean": 0.25,
    "blur_sigma_max": 1.0,
    "noise_std_max": 0.06,
    "gain_max": 0.06,
    "offset_max": 0.04,
}
REFERENCE_SEED = 20_240_601  # seed of the held-out real renders behind reference_stats()
REFERENCE_N = 50_000
"""Real renders behind probe-FD: the FID recipe's large reference set. 2,000 were too few: that sample's own
noise ranked two 4-step samplers the other way round from three independent sets of 10,000-50,000."""
REFERENCE_NAME = "reference_stats.safetensors"

ImageBatch = Sequence[Image.Image | np.ndarray] | np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------


class ProbeNet(nn.Module):
    """4 conv blocks (32 -> 32 -> 16 -> 8 -> 4 px), a flattened feature layer, one linear head per attribute.

    The 4x4 map is flattened rather than pooled, so the features keep where the object is.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64, 32), feature_dim: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** (len(channels) - 1)
        self.feature = nn.Linear(c_in * side * side, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(ATTRIBUTE_VALUES[name])) for name in ATTRIBUTES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, 32, 32) in [-1, 1] -> (n, feature_dim) penultimate features (post-ReLU)."""
        return F.relu(self.feature(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features and per-attribute logits."""
        feats = self.features(x)
        return feats, {name: head(feats) for name, head in self.heads.items()}


def param_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------
# Image conversion
# ----------------------------------------------------------------------------------------------------------


def _as_float_hwc(image: Image.Image | np.ndarray) -> np.ndarray:
    """One image -> float32 HxWx3 in 0..255 (uint8 as is; floats with max <= 1 are taken as [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    array = array.astype(np.float32)
    return array * 255.0 if array.max(initial=0.0) <= 1.0 + 1e-6 else array


def images_to_tensor(images: ImageBatch) -> torch.Tensor:
    """Images -> float (n, 3, 32, 32) in [-1, 1].

    Accepts a list of PIL images or HxWx3 arrays, a uint8 array (n, h, w, 3), or a float array in [0, 1]
    (NCHW is recognised too). Other sizes are area-resized to 32x32.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        array = images
        if array.shape[1] == 3 and array.shape[-1] != 3:
            array = array.transpose(0, 2, 3, 1)
        if array.dtype == np.uint8:
            array = array.astype(np.float32)
        else:
            array = array.astype(np.float32)
            if array.max(initial=0.0) <= 1.0 + 1e-6:
                array = array * 255.0
    else:
        if len(images) == 0:
            return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        converted = [_as_float_hwc(image) for image in images]
        if len({a.shape for a in converted}) > 1:
            converted = [_resize(a) for a in converted]
        array = np.stack(converted)
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).clamp(0.0, 255.0).div(127.5).sub(1.0)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x.contiguous()


def _resize(array: np.ndarray) -> np.ndarray:
    """Area-resize one float HxWx3 image to 32x32."""
    if array.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return array
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0].permute(1, 2, 0).numpy()


def scene_labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Per-attribute class indices (long tensors of shape (n,)) of `scenes`."""
    return {
        name: torch.tensor([ATTRIBUTE_VALUES[name].index(getattr(s, name)) for s in scenes], dtype=torch.long)
        for name in ATTRIBUTES
    }


# ----------------------------------------------------------------------------------------------------------
# Probe (inference API)
# ----------------------------------------------------------------------------------------------------------


class Probe:
    """A trained ProbeNet in eval mode plus its config; reads attributes and extracts FD features."""

    def __init__(self, net: ProbeNet, config: dict[str, Any] | None = None, batch_size: int = 500) -> None:
        self.net = net.eval()
        self.config = dict(config or {})
        self.batch_size = batch_size
        self.directory: Path | None = None  # where it was loaded from (its shipped reference statistics)
        self._reference_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def feature_dim(self) -> int:
        """Dimension d of the features."""
        return self.net.feature.out_features

    @torch.no_grad()
    def _run(self, images: ImageBatch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = images_to_tensor(images)
        feats, logits = [], {name: [] for name in ATTRIBUTES}
        for start in range(0, max(len(x), 1), self.batch_size):
            f, out = self.net(x[start : start + self.batch_size])
            feats.append(f)
            for name in ATTRIBUTES:
                logits[name].append(out[name])
        return (
            torch.cat(feats).double().numpy(),
            {name: torch.cat(v).numpy() for name, v in logits.items()},
        )

    def features(self, images: ImageBatch) -> np.ndarray:
        """Penultimate features, float64 array (n, d)."""
        return self._run(images)[0]

    def logits(self, images: ImageBatch) -> dict[str, np.ndarray]:
        """Per-attribute logits, {attribute: (n, n_values)}."""
        return self._run(images)[1]

    def predict(self, images: ImageBatch) -> list[Scene]:
        """The scene each image shows, as read by the probe."""
        picks = {name: v.argmax(axis=1) for name, v in self.logits(images).items()}
        n = len(picks[ATTRIBUTES[0]])
        return [Scene(**{name: ATTRIBUTE_VALUES[name][int(picks[name][i])] for name in ATTRIBUTES}) for i in range(n)]

    def accuracy(self, images: ImageBatch, scenes: Sequence[Scene]) -> dict[str, float]:
        """Per-attribute accuracy against the true scenes, plus "all" (every attribute right)."""
        predicted = self.predict(images)
        if len(predicted) != len(scenes):
            raise ValueError(f"{len(predicted)} images but {len(scenes)} scenes")
        n = max(len(scenes), 1)
        result = {name: sum(getattr(p, name) == getattr(s, name) for p, s in zip(predicted, scenes)) / n
                  for name in ATTRIBUTES}  # fmt: skip
        result["all"] = sum(p == s for p, s in zip(predicted, scenes)) / n
        return result


def load_probe(path: str | os.PathLike | None = None) -> Probe:
    """Load a probe saved by train_probe (default: the shipped one, offline); cached per directory."""
    return _load_probe(str(Path(path or ASSET_DIR).resolve()))


@functools.lru_cache(maxsize=4)
def _load_probe(directory: str) -> Probe:
    from safetensors.torch import load_file

    folder = Path(directory)
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"no probe at {folder} (expected {WEIGHTS_NAME} and {CONFIG_NAME})")
    config = json.loads(config_path.read_text())
    if config.get("attributes") not in (None, {k: list(v) for k, v in ATTRIBUTE_VALUES.items()}):
        raise ValueError(f"probe at {folder} was trained for different attribute values")
    arch = config.get("arch", DEFAULT_ARCH)
    net = ProbeNet(channels=arch["channels"], feature_dim=arch["feature_dim"])
    net.load_state_dict(load_file(str(weights)))
    probe = Probe(net, config)
    probe.directory = folder
    return probe


def save_probe(probe: Probe, out_dir: str | os.PathLike) -> None:
    """Write probe.safetensors and probe.json under `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in probe.net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS_NAME, 0o644)  # safetensors writes 0600; the file ships with the package
    (out / CONFIG_NAME).write_text(json.dumps(probe.config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------


def reference_stats(
    n: int = REFERENCE_N, seed: int = REFERENCE_SEED, probe: Probe | None = None
) -> tuple[np.ndarray, ...]:
    """(mu, sigma) of the probe features of `n` held-out real renders (random scenes, jittered); cached.

    Read from the probe's folder when it holds them for these n and seed and these very weights
    (write_reference_stats), else computed. The arrays are read-only (they are shared by every caller).
    """
    probe = probe or load_probe()
    key = (int(n), int(seed))
    if key not in probe._reference_cache:
        stats = _read_reference_stats(probe, n, seed)
        mu, sigma = stats if stats is not None else _render_stats(probe, n, seed)
        mu.flags.writeable = False
        sigma.flags.writeable = False
        probe._reference_cache[key] = (mu, sigma)
    return probe._reference_cache[key]


def _render_stats(probe: Probe, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return feature_stats(probe.features(rendered_set(n, seed)[0]))


def _weights_sha256(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()


def _read_reference_stats(probe: Probe, n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    from safetensors import safe_open

    path = probe.directory / REFERENCE_NAME if probe.directory else None
    if path is None or not path.is_file():
        return None
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("n") != str(n) or meta.get("seed") != str(seed):
            return None
        if meta.get("probe_sha256") != _weights_sha256(probe.directory):
            return None  # the probe was retrained: these statistics belong to the old one
        return f.get_tensor("mu").copy(), f.get_tensor("sigma").copy()


def write_reference_stats(folder: str | os.PathLike, n: int = REFERENCE_N, seed: int = REFERENCE_SEED) -> Path:
    """Compute reference_stats(n, seed) for the probe in `folder` and store them beside it (read back by
    reference_stats), tagged with n, seed and the probe weights' SHA-256."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    probe = load_probe(folder)
    mu, sigma = _render_stats(probe, n, seed)
    path = folder / REFERENCE_NAME
    tmp = path.with_name(path.name + ".tmp")
    meta = {"n": str(n), "seed": str(seed), "probe_sha256": _weights_sha256(folder)}
    save_file({"mu": np.ascontiguousarray(mu), "sigma": np.ascontiguousarray(sigma)}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    probe._reference_cache.pop((int(n), int(seed)), None)
    return path


def probe_fd(images_a: ImageBatch, images_b: ImageBatch | None = None, probe: Probe | None = None) -> float:
    """Frechet distance between the probe features of two image sets (images_b=None: reference_stats())."""
    probe = probe or load_probe()
    mu1, sigma1 = feature_stats(probe.features(images_a))
    mu2, sigma2 = reference_stats(probe=probe) if images_b is None else feature_stats(probe.features(images_b))
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def rendered_set(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`n` random scenes rendered with seeded jitter: uint8 (n, 32, 32, 3) and the scenes."""
    scenes = sample_scenes(n, seed)
    return render_array(scenes, [sample_seed(seed, i) for i in range(n)]), scenes


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable gaussian blur (5 taps, replicate padding); sigma (n,) in pixels, 0 = identity."""
    n, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 5)
    y = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator, settings: dict[str, float] | None = None) -> torch.Tensor:
    """Light degradations that keep every attribute: blur, colour gain/offset and gaussian noise.

    x: (n, 3, 32, 32) in [-1, 1]; a fraction p_clean of the images is left untouched.
    """
    cfg = {**DEFAULT_AUGMENT, **(settings or {})}
    n = x.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    pixels = (x + 1) / 2
    pixels = _gaussian_blur(pixels, uniform(n) * cfg["blur_sigma_max"])
    gain = 1 + (2 * uniform(n, 3, 1, 1) - 1) * cfg["gain_max"]
    offset = (2 * uniform(n, 3, 1, 1) - 1) * cfg["offset_max"]
    pixels = pixels * gain + offset
    noise_std = uniform(n, 1, 1, 1) * cfg["noise_std_max"]
    pixels = pixels + noise_std * torch.randn(pixels.shape, generator=generator)
    out = pixels.clamp(0, 1) * 2 - 1
    clean = (uniform(n) < cfg["p_clean"])[:, None, None, None]
    return torch.where(clean, x, out)


def training_batch(step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh renders and labels of training step `step`, a pure function of (seed, step)."""
    images, scenes = rendered_set(batch_size, sample_seed(seed, step))
    return images_to_tensor(images), scene_labels(scenes)


def eval_seed_for(seed: int) -> int:
    """Seed of the held-out evaluation renders of a training run with `seed` (independent of training)."""
    return int(np.random.SeedSequence([seed, 0xE7A1]).generate_state(1)[0])


def evaluate_probe(probe: Probe, n: int = 2000, seed: int = 1, degraded: bool = False) -> dict[str, float]:
    """Per-attribute accuracy on `n` held-out renders (optionally degraded with `augment`, no clean ones)."""
    images, scenes = rendered_set(n, seed)
    if degraded:
        generator = torch.Generator().manual_seed(seed)
        images = ((augment(images_to_tensor(images), generator, {"p_clean": 0.0}) + 1) / 2).permute(0, 2, 3, 1)
        images = images.numpy()
    return probe.accuracy(images, scenes)


def train_probe(
    out_dir: str | os.PathLike | None = ASSET_DIR,
    steps: int = 600,
    batch_size: int = 128,
    seed: int = 0,
    num_threads: int = 1,
    lr: float = 3e-3,
    eval_n: int = 2000,
    progress: bool = True,
) -> tuple[Probe, dict[str, Any]]:
    """Train a probe on freshly rendered, lightly degraded images; evaluate; save to `out_dir` (None: don't).

    AdamW with linear warm-up and cosine decay, summed cross-entropy over the five heads. Evaluation:
    per-attribute accuracy on `eval_n` clean held-out renders (seed eval_seed_for(seed)) and on degraded
    copies of them. Returns the probe and its config (which is also written to probe.json).
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    net = ProbeNet(**DEFAULT_ARCH)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    net.train()
    bar = tqdm(range(steps), desc="probe", disable=not progress)
    for step in bar:
        x, labels = training_batch(step, batch_size, seed)
        x = augment(x, generator)
        _, logits = net(x)
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - start

    eval_seed = eval_seed_for(seed)
    config: dict[str, Any] = {
        "arch": dict(DEFAULT_ARCH),
        "attributes": {k: list(v) for k, v in ATTRIBUTE_VALUES.items()},
        "input": "RGB 32x32, (n, 3, 32, 32) in [-1, 1] = pixels / 127.5 - 1",
        "params": param_count(net),
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "num_threads": num_threads,
            "augment": dict(DEFAULT_AUGMENT),
            "wall_time_s": round(train_seconds, 1),
            "final_loss": round(float(loss.item()), 6) if steps else None,
        },
    }
    probe = Probe(net, config)
    clean = evaluate_probe(probe, eval_n, eval_seed)
    degraded = evaluate_probe(probe, eval_n, eval_seed, degraded=True)
    config["eval"] = {
        "n": eval_n,
        "seed": eval_seed,
        "accuracy": {k: round(v, 5) for k, v in clean.items()},
        "accuracy_degraded": {k: round(v, 5) for k, v in degraded.items()},
    }
    probe.config = config
    if out_dir is not None:
        save_probe(probe, out_dir)
        _load_probe.cache_clear()
        write_reference_stats(out_dir)
    return probe, config


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train the probe and write it (default: the shipped asset folder)."""
    parser = argparse.ArgumentParser(description="Train the toy attribute probe (the FD feature extractor).")
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help=f"only (re)write {REFERENCE_NAME} for the probe in --out ({REFERENCE_N:,} renders)",
    )
    args = parser.parse_args(argv)
    if args.reference_only:
        print(f"wrote {write_reference_stats(args.out)}")
        return
    _, config = train_probe(args.out, args.steps, args.batch_size, args.seed, args.threads, lr=args.lr)
    print(json.dumps({"params": config["params"], "train": config["train"], "eval": config["eval"]}, indent=2))


if __name__ == "__main__":
    main()
