"""`lcmkit eval`: what a few-step model traded, in numbers and pictures.

Every sampler (the distilled model at 1, 2, 4, 8 steps; the teacher's DDIM and DPM-Solver++ with guidance
at the same counts plus 25 and 50) renders the same prompts from the same initial noise, and each image
is compared with the teacher's DDIM 50-step image of the same noise. Metrics are small pure functions
over image tensors; optional ones (CLIP score, FID) run only from weights the user already has on disk.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lcmkit.errors import ConfigError
from lcmkit.infer.sampling import DEFAULT_TCD_GAMMA, grid_sigmas
from lcmkit.infer.schedulers import LCM_SAMPLERS, check_tcd_gamma, with_sampler

# -- metrics ----------------------------------------------------------------------------------------------


def to_unit_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or uint8 HxWx3 arrays -> float64 (n, 3, h, w) in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(range^2 / MSE); inf where x == y."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


# Wang, Simoncelli & Bovik (2003), "Multi-scale structural similarity for image quality assessment", Table 1.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """Separable gaussian filter per channel with reflect padding ('same' size, any image >= 6 px)."""
    size = min(size, 2 * (min(x.shape[-2:]) // 2) - 1)
    coords = torch.arange(size, dtype=x.dtype) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (size // 2,) * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)


def ssim_terms(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(luminance, contrast-structure) terms of SSIM per image, averaged over pixels and channels (Wang 2004,
    eq. 6-9 with the standard C1 = (0.01 L)^2, C2 = (0.03 L)^2 and an 11-tap sigma-1.5 gaussian window)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _gaussian_blur(x), _gaussian_blur(y)
    var_x = _gaussian_blur(x * x) - mu_x**2
    var_y = _gaussian_blur(y * y) - mu_y**2
    cov = _gaussian_blur(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return luminance.flatten(1).mean(1), contrast_structure.flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_scales: int = 5) -> torch.Tensor:
    """Multi-scale SSIM per image (1 for identical images).

    As many 2x-downsampled scales as keep the smallest side >= 8 px (5 at 128 px and above, 3 at 32 px), with
    Wang et al.'s scale weights renormalised to the scales used; negative terms are clipped at 0 first."""
    x, y = x.double(), y.double()
    scales = max(1, min(max_scales, int(math.log2(min(x.shape[-2:]) / 8)) + 1))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    result = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(scales):
        luminance, contrast_structure = ssim_terms(x, y, data_range)
        term = contrast_structure if i < scales - 1 else luminance * contrast_structure
        result = result * term.clamp(min=0.0) ** weights[i]
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


def ms_ssim_distance(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """1 - MS-SSIM per image: the offline perceptual-ish distance of `lcmkit eval` (0 for identical images,
    growing with structural distortion; no learned weights, so nothing to download)."""
    return 1.0 - ms_ssim(x, y, data_range)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of features (n, d), float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features of shape (n >= 2, d), got {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (symmetrized, tiny negative eigenvalues clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)), where tr((s1 s2)^(1/2)) is computed as the
    trace of the square root of the symmetric PSD matrix sqrt(s1) s2 sqrt(s1) (same eigenvalues), from its
    clipped eigenvalues. Numpy only; never negative.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} has non-finite entries")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root1 = _psd_sqrt(s1)
    product = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_covmean)
    return max(value, 0.0)


def feature_fd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between gaussians fitted to two feature sets (n, d): FID with Inception features."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def seconds_per_image(seconds: float, n_images: int) -> float:
    """Wall time of a run divided by the images it made."""
    if n_images < 1:
        raise ValueError("no images")
    return seconds / n_images


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """CLIPScore (Hessel et al. 2021, w = 100): mean over pairs of 100 * max(cos(image, text), 0)."""
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return float((100.0 * cos.clamp(min=0.0)).mean())


# -- optional models, from local files only ----------------------------------------------------------------

# (images, prompts, reference images: empty without a DDIM 50 column) -> {metric: value}
Scorer = Callable[[list[Image.Image], list[str], list[Image.Image]], dict[str, float]]


def agreement(images: list[Image.Image], prompts: list[str], reference: list[Image.Image]) -> dict[str, float]:
    """Mean PSNR (dB) and mean 1 - MS-SSIM against the reference images of the same noise (none without them)."""
    if not reference:  # no DDIM 50 column (--teacher-steps without 50)
        return {}
    x, y = to_unit_tensor(images), to_unit_tensor(reference)
    return {"psnr": float(psnr(x, y).mean()), "ms_ssim_distance": float(ms_ssim_distance(x, y).mean())}


def local_weights(flag: str | None, env: str) -> str | None:
    """The path given by flag, else by environment variable `env`, else None."""
    return flag or os.environ.get(env) or None


def clip_scorer(folder: str, device: str = "auto") -> Scorer:
    """CLIP score from a local transformers CLIP folder (CLIPModel + processor, .safetensors weights)."""
    from transformers import AutoProcessor, CLIPModel

    from lcmkit.runtime import pick_device

    device = pick_device(device)
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"--clip-model {folder}: not a transformers CLIP folder (no config.json)")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ConfigError(f"--clip-model {folder}: could not load it offline: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def score(images: list[Image.Image], prompts: list[str], reference: list[Image.Image]) -> dict[str, float]:
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        return {"clip_score": clip_score(out.image_embeds.cpu(), out.text_embeds.cpu())}

    return score


def inception_features(path: str, device: str = "auto") -> Callable[[list[Image.Image]], np.ndarray]:
    """2048-d pool features of torchvision's Inception-v3 loaded from a local .safetensors state dict.

    Not bit-identical to the TF-Inception of the original FID code, so compare values only with each other."""
    if not Path(path).is_file() or not path.endswith(".safetensors"):
        raise ConfigError(f"--inception {path}: give an existing .safetensors file (pickles are refused)")
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise ConfigError("--inception needs torchvision (pip install torchvision)") from None
    from safetensors.torch import load_file

    from lcmkit.runtime import pick_device
    from lcmkit.safe_load import check_safetensors

    check_safetensors(path, "--inception")
    device = pick_device(device)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        net.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise ConfigError(f"--inception {path}: not torchvision Inception-v3 weights: {str(e)[:200]}") from None
    net.fc = torch.nn.Identity()
    net = net.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(images: list[Image.Image]) -> np.ndarray:
        x = F.interpolate(to_unit_tensor(images).float(), size=(299, 299), mode="bilinear", align_corners=False)
        return net(((x - mean) / std).to(device)).double().cpu().numpy()

    return features


def fid_scorer(features: Callable[[list[Image.Image]], np.ndarray]) -> Scorer:
    """FID of a sampler's images against the teacher's 50-step reference images (same prompts and noise)."""
    cache: dict[int, np.ndarray] = {}

    def score(images: list[Image.Image], prompts: list[str], reference: list[Image.Image]) -> dict[str, float]:
        if not reference:  # no DDIM 50 column (--teacher-steps without 50)
            return {}
        if id(reference) not in cache:
            cache[id(reference)] = features(reference)
        return {"fid": feature_fd(features(images), cache[id(reference)])}

    return score


def optional_scorers(clip_model: str | None, inception: str | None, device: str) -> tuple[list[Scorer], list[str]]:
    """CLIP score and FID scorers from local weights (flag, else LCMKIT_CLIP / LCMKIT_INCEPTION), and one
    line for each metric skipped. Never downloads anything."""
    scorers, skipped = [], []
    clip_path = local_weights(clip_model, "LCMKIT_CLIP")
    if clip_path:
        scorers.append(clip_scorer(clip_path, device))
    else:
        skipped.append("CLIP score skipped: no local CLIP weights (pass --clip-model DIR or set LCMKIT_CLIP; "
                       "lcmkit never downloads them)")  # fmt: skip
    inception_path = local_weights(inception, "LCMKIT_INCEPTION")
    if inception_path:
        scorers.append(fid_scorer(inception_features(inception_path, device)))
    else:
        skipped.append("FID skipped: no local Inception weights (pass --inception FILE.safetensors or set "
                       "LCMKIT_INCEPTION; lcmkit never downloads them)")  # fmt: skip
    return scorers, skipped


# -- sampling ----------------------------------------------------------------------------------------------


@dataclass
class Column:
    """One sampler setting: a column of the grid and a row of the table."""

    label: str
    group: str
    pipe: Any
    steps: int
    guidance: float
    options: dict[str, Any] = field(default_factory=dict)
    """Further pipeline arguments of this sampler (TCD's gamma, as eta)."""
    images: list[Image.Image] = field(default_factory=list)
    seconds_per_image: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    reference: bool = False
    """The teacher's deterministic sampler (DDIM; Euler for a flow teacher): its 50-step images are the reference."""


def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; every count must be a positive integer."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: give comma-separated integers, e.g. 1,2,4,8") from None
    if not steps or min(steps) < 1:
        raise ConfigError(f"{flag} {text}: every step count must be >= 1")
    return sorted(set(steps))


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a text file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--prompts {path} does not exist (give a file with one prompt per line, or 'toy')")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path} holds no prompt")
    return prompts


def cycle(prompts: list[str], n: int) -> list[str]:
    """`n` prompts, repeating the list as needed (image i uses seed + i, so repeats differ)."""
    return [prompts[i % len(prompts)] for i in range(n)]


def sample_columns(
    columns: list[Column], prompts: list[str], noise: torch.Tensor, seed: int, batch_size: int, size: int,
    progress: bool = True,
) -> None:  # fmt: skip
    """Fill each column's images and seconds per image (after one untimed warm-up call per pipeline)."""
    from tqdm.auto import tqdm

    from lcmkit.infer.pipelines import run_batched

    warm: set[int] = set()
    for col in tqdm(columns, desc="sampling", disable=not progress):
        kwargs = dict(num_inference_steps=col.steps, guidance_scale=col.guidance, height=size, width=size,
                      **col.options)  # fmt: skip
        if id(col.pipe) not in warm:
            run_batched(col.pipe, prompts[:1], seed, 1, latents=noise[:1], **{**kwargs, "num_inference_steps": 1})
            warm.add(id(col.pipe))
        start = time.perf_counter()
        col.images = run_batched(col.pipe, prompts, seed, batch_size, latents=noise, **kwargs)
        col.seconds_per_image = seconds_per_image(time.perf_counter() - start, len(prompts))


def score_columns(
    columns: list[Column],
    prompts: list[str],
    reference: list[Image.Image],
    scorers: list[Scorer],
    progress: bool = True,
) -> None:
    from tqdm.auto import tqdm

    for col in tqdm(columns, desc="scoring", disable=not progress):
        for scorer in scorers:
            col.metrics.update(scorer(col.images, prompts, reference))


# -- report ------------------------------------------------------------------------------------------------

# metric -> (table header, format, plot label)
METRICS: dict[str, tuple[str, str, str]] = {
    "psnr": ("PSNR vs ref (dB)", "{:.2f}", "PSNR vs teacher DDIM 50 (a flow teacher: Euler 50) (dB), higher = closer"),
    "ms_ssim_distance": ("1-MS-SSIM vs ref", "{:.4f}", "1 - MS-SSIM vs teacher DDIM 50 (Euler 50), lower = closer"),
    "prompt_accuracy": ("prompt accuracy", "{:.1%}", "prompt accuracy (toy checker)"),
    "probe_fd": ("probe-FD", "{:.2f}", "probe-FD to real toy renders, lower = better"),
    "clip_score": ("CLIP score", "{:.2f}", "CLIP score, higher = better"),
    "fid": ("FID vs ref", "{:.2f}", "FID to the teacher's DDIM 50 images"),
}


def common_metrics(columns: list[Column]) -> list[str]:
    """Metrics every column has, in METRICS order."""
    return [m for m in METRICS if all(m in c.metrics for c in columns)]


def _cell(metric: str, value: float) -> str:
    return "ref" if not math.isfinite(value) else METRICS[metric][1].format(value)


def markdown_table(columns: list[Column]) -> str:
    from lcmkit.measure.system import markdown

    metrics = common_metrics(columns)
    header = ["sampler", "steps", "guidance", *(METRICS[m][0] for m in metrics), "s/image"]
    rows = [[c.label, str(c.steps), f"{c.guidance:g}", *(_cell(m, c.metrics[m]) for m in metrics),
             f"{c.seconds_per_image:.4f}"] for c in columns]  # fmt: skip
    return markdown(header, rows)


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def json_record(columns: list[Column], info: dict[str, Any]) -> dict[str, Any]:
    """Plain-JSON record of every column; non-finite numbers (the reference's PSNR) become null."""
    rows = [{"label": c.label, "group": c.group, "steps": c.steps, "guidance": c.guidance,
             "seconds_per_image": c.seconds_per_image, **{k: _finite_or_none(v) for k, v in c.metrics.items()}}
            for c in columns]  # fmt: skip
    return {"columns": rows, **info}


def _visible_range(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """y-limits that keep the few-step differences visible: the span of every point at 2 steps or more, with a
    margin; points outside it (typically 1 step, far worse) are drawn at the edge with their value printed."""
    ys = [y for steps, y in points if steps >= 2] or [y for _, y in points]
    if len(ys) < 2:
        return None
    lo, hi = min(ys), max(ys)
    margin = 0.12 * (hi - lo) or 0.05 * abs(hi) or 1.0
    return lo - margin, hi + margin


def quality_plot(columns: list[Column], path: Path, title: str = "quality against cost") -> None:
    """One row per metric: the metric against sampling steps (left) and against seconds per image (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = common_metrics(columns)
    if not metrics:
        return
    groups = list(dict.fromkeys(c.group for c in columns))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics):
        every = [(c.steps, c.metrics[metric]) for c in columns if math.isfinite(c.metrics[metric])]
        limits = _visible_range(every)
        for x_name, ax in zip(("steps", "seconds_per_image"), row):
            for group, marker in zip(groups, itertools.cycle(("o-", "s--", "^:", "d-.", "v-", "x--"))):
                points = sorted((getattr(c, x_name), c.metrics[metric]) for c in columns if c.group == group)
                points = [(x, y) for x, y in points if math.isfinite(y)]
                ax.plot([p[0] for p in points], [_clip(p[1], limits) for p in points], marker, label=group)
                for x, y in points:
                    edge = _clip(y, limits)
                    if edge != y:  # off the scale: at the edge, with its value (below the top edge, above the bottom)
                        offset = (4, -10 if y > edge else 4)
                        ax.annotate(f"{y:.3g}", (x, edge), textcoords="offset points", xytext=offset, fontsize=7)
            if limits is not None:
                ax.set_ylim(*limits)
            ax.set_xscale("log", base=2 if x_name == "steps" else 10)
            ax.set_xlabel("sampling steps" if x_name == "steps" else "seconds per image")
            ax.set_ylabel(METRICS[metric][2], fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _clip(y: float, limits: tuple[float, float] | None) -> float:
    return y if limits is None else min(max(y, limits[0]), limits[1])


def legend(columns: list[Column]) -> str:
    """What the table's columns mean (written under it in the .md report)."""
    lines = [
        "- sampler: the model and scheduler; `teacher DDIM` / `teacher DPM++` are the teacher with classifier-free "
        "guidance, `LCM` the distilled model on LCMScheduler (a flow model's FlowMatchLCMScheduler), `TCD` on "
        "TCDScheduler, `Euler` a flow model's deterministic Euler steps on its training grid, `shipped` a LoRA made "
        "earlier.",
        "- steps: denoising steps (each costs one network call; the teacher's two with guidance).",
        "- guidance: the guidance_scale passed to the pipeline (1 = no classifier-free guidance pass).",
        *(f"- {METRICS[m][0]}: {METRICS[m][2]}." for m in common_metrics(columns)),
        "- s/image: wall-clock seconds per image on this machine, batched, decoding included.",
        "- Every sampler starts image i from the same noise and prompt.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(columns: list[Column], out: Path, info: dict[str, Any], stem: str = "eval") -> str:
    """{stem}.md (markdown table), {stem}.json and quality.png in `out`; returns the table."""
    table = markdown_table(columns)
    (out / f"{stem}.md").write_text(table + "\n" + legend(columns))
    (out / f"{stem}.json").write_text(json.dumps(json_record(columns, info), indent=2, allow_nan=False) + "\n")
    quality_plot(columns, out / "quality.png", "quality against steps and seconds per image (same prompts and noise)")
    return table


# -- the evaluation ----------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    teacher: str
    prompts: list[str]
    lora: str | None = None
    lcm: str | None = None
    teacher_config: str | None = None
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    reference_steps: tuple[int, ...] = (25, 50)
    teacher_steps: list[int] | None = None
    """The teacher's step counts (default: `steps` plus `reference_steps`); without 50 (DDIM) no agreement metrics."""
    teacher_samplers: tuple[str, ...] = ("ddim", "dpm++")
    lcm_samplers: tuple[str, ...] = ("lcm",)
    """The distilled model's samplers: lcm (LCMScheduler), tcd (TCDScheduler with `tcd_gamma`), euler (a flow
    model's deterministic Euler on its training grid)."""
    tcd_gamma: float = DEFAULT_TCD_GAMMA
    guidance: float | None = None
    """The teacher's guidance scale (default: its family's, e.g. 7.5 for SD; and a full UNet LCM's w input unless
    lcm_guidance is set)."""
    lcm_guidance: float | None = None
    """Default: 1 for an LCM-LoRA (no CFG), `guidance` for a full LCM."""
    seed: int = 0
    size: int | None = None
    batch_size: int = 8
    grid_rows: int = 4
    device: str = "auto"
    dtype: str = "auto"
    out: str = "eval"
    progress: bool = True

    def check(self) -> None:
        if self.lora and self.lcm:
            raise ConfigError("give either --lora or --lcm, not both")
        if not self.prompts:
            raise ConfigError("no prompts to evaluate")
        if min(self.steps, default=0) < 1:
            raise ConfigError(f"--steps {self.steps}: every step count must be >= 1")
        if self.teacher_steps is not None and min(self.teacher_steps, default=0) < 1:
            raise ConfigError(f"--teacher-steps {self.teacher_steps}: every step count must be >= 1")
        unknown = sorted(set(self.teacher_samplers) - set(TEACHER_SAMPLERS))
        if unknown or not self.teacher_samplers:
            raise ConfigError(f"--teacher-samplers {','.join(self.teacher_samplers)}: choose from "
                              f"{','.join(TEACHER_SAMPLERS)}")  # fmt: skip
        unknown = sorted(set(self.lcm_samplers) - set(LCM_SAMPLERS))
        if unknown or not self.lcm_samplers:
            raise ConfigError(f"--lcm-samplers {','.join(self.lcm_samplers)}: choose from {','.join(LCM_SAMPLERS)}")
        check_tcd_gamma(self.tcd_gamma)
        for name in ("batch_size", "grid_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise ConfigError(f"--resolution {self.size}: must be a multiple of 8")


REFERENCE_STEPS = 50
TEACHER_SAMPLERS = {"ddim": "teacher DDIM", "dpm++": "teacher DPM++", "euler": "teacher Euler"}
SAMPLER_LABELS = {"lcm": "", "tcd": "TCD", "euler": "Euler"}
"""The distilled model's column names by sampler: "LCM-LoRA 4", "LCM-LoRA TCD 4", "LCM-LoRA Euler 4"."""


def sampler_columns(group: str, pipe: Any, sampler: str, steps: list[int], guidance: float, grid: int,
                    tcd_gamma: float) -> list[Column]:  # fmt: skip
    """A distilled model on one of its samplers (LCM_SAMPLERS) at each step count: TCD at `tcd_gamma`, a flow
    model's Euler on its `grid`-point training grid."""
    twin = with_sampler(pipe, sampler)

    def options(n: int) -> dict[str, Any]:
        if sampler == "euler":
            return {"sigmas": grid_sigmas(n, grid)}
        return {"eta": tcd_gamma} if sampler == "tcd" else {}

    return [Column(f"{group} {n}", group, twin, n, guidance, options(n)) for n in steps]


def build_columns(settings: EvalSettings) -> list[Column]:
    """The distilled model at each step count, then the teacher's DDIM and DPM-Solver++ with guidance at the
    same counts plus the reference counts. Loads every model once."""
    from lcmkit.families.teacher import ModelConfig, load_teacher
    from lcmkit.infer.generator import distilled_pipeline
    from lcmkit.infer.pipelines import teacher_pipeline
    from lcmkit.infer.sampling import full_lcm_ddim_timesteps, lcm_lora_ddim_timesteps
    from lcmkit.infer.schedulers import reference_sampler, teacher_scheduler
    from lcmkit.runtime import pick_device, pick_dtype

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    teacher = load_teacher(ModelConfig(teacher=settings.teacher, teacher_config=settings.teacher_config), dtype)
    guidance = teacher.family.teacher_guidance if settings.guidance is None else settings.guidance
    columns: list[Column] = []
    if settings.lora or settings.lcm:
        s = settings
        pipe, name, w = distilled_pipeline(
            s.teacher, s.lora, s.lcm, s.teacher_config, device, s.dtype, guidance, s.lcm_guidance
        )
        grid = full_lcm_ddim_timesteps(s.lcm) if s.lcm else lcm_lora_ddim_timesteps([(s.lora, 1.0)])
        for sampler in settings.lcm_samplers:
            group = f"{name} {SAMPLER_LABELS[sampler]}".rstrip()
            columns += sampler_columns(group, pipe, sampler, settings.steps, w, grid, settings.tcd_gamma)
    chosen = settings.teacher_steps
    teacher_steps = sorted({*settings.steps, *settings.reference_steps} if chosen is None else {*chosen})
    reference = reference_sampler(teacher.scheduler.config)
    for sampler in settings.teacher_samplers:
        sampler = reference if sampler == "ddim" else sampler  # a flow teacher's deterministic sampler: its Euler
        group = TEACHER_SAMPLERS[sampler]
        pipe = teacher_pipeline(teacher, teacher.denoiser, teacher_scheduler(teacher.scheduler.config, sampler))
        pipe.to(device, dtype)
        columns += [Column(f"{group} {n}", group, pipe, n, guidance, reference=sampler == reference)
                    for n in teacher_steps]  # fmt: skip
    return columns


def run_eval(settings: EvalSettings, scorers: list[Scorer] | None = None) -> dict[str, Any]:
    """Sample every column, score it against the reference, write eval.json/md, quality.png and grid.png."""
    from lcmkit.infer.images import image_grid
    from lcmkit.infer.pipelines import default_size, denoiser_of, initial_noise
    from lcmkit.measure.system import machine

    settings.check()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    columns = build_columns(settings)
    pipe = columns[-1].pipe
    size = settings.size or default_size(pipe)
    shape = (int(pipe.vae.config.latent_channels), size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    noise = initial_noise(len(settings.prompts), shape, settings.seed)
    sample_columns(columns, settings.prompts, noise, settings.seed, settings.batch_size, size, settings.progress)
    ref = next((c for c in columns if c.reference and c.steps == REFERENCE_STEPS), None)
    reference = ref.images if ref else []
    score_columns(columns, settings.prompts, reference, [agreement, *(scorers or [])], settings.progress)

    rows = [[c.images[i] for c in columns] for i in range(min(settings.grid_rows, len(settings.prompts)))]
    image_grid(rows, settings.prompts, [c.label for c in columns]).save(out / "grid.png")
    info = {
        "teacher": settings.teacher, "lora": settings.lora, "lcm": settings.lcm,
        "reference": ref.label if ref else None,
        "lcm_samplers": list(settings.lcm_samplers), "tcd_gamma": settings.tcd_gamma,
        "n_images": len(settings.prompts), "seed": settings.seed, "resolution": size,
        "batch_size": settings.batch_size, "device": str(pipe.device),
        "dtype": str(denoiser_of(pipe).dtype).removeprefix("torch."), "machine": machine(),
        "total_s": time.perf_counter() - t0,
    }  # fmt: skip
    table = write_report(columns, out, info)
    return {"table": table, "out": str(out), **info}
