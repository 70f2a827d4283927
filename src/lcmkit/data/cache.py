"""`lcmkit cache`: VAE latent distributions and text embeddings computed once, read back as a data source.

A naive LCD step re-encodes the same images and captions every time; from a cache a step only runs the
UNets. The cache stores each sample's latent mean and std (so each step still draws a fresh latent, exactly
as `latent_dist.sample()` does), the text conditioning (SDXL, SD3, FLUX: pooled too), original size and crop. It is
tied to the VAE and text encoder(s) it was made with (a fingerprint of their weights: fine-tunes that share
them share caches) and to the resolution; distill refuses a cache that does not match its teacher.

Layout: `cache.json` (written last: a folder without it is unfinished) and `shard-NNNNN.safetensors`, each
written atomically. An interrupted `lcmkit cache` resumes after its last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lcmkit.data.base import Skip, Source
from lcmkit.errors import ConfigError

CACHE_FORMAT = "lcmkit-cache"
CACHE_VERSION = 1
INDEX, PROGRESS = "cache.json", "cache.progress.json"
TENSORS = ("latent_mean", "latent_std", "hidden_states", "pooled", "original_size", "crop_top_left")


def is_cache(path: Path) -> bool:
    return (path / INDEX).is_file()


def encoder_fingerprint(vae: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> str:
    """A short hash of the VAE and text encoder weights (every tensor's shape, sum and first values)."""
    h = hashlib.sha256()
    for i, module in enumerate([vae, *text_encoders]):
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().float().flatten()
            h.update(f"{i}:{name}:{tuple(tensor.shape)}:{float(flat.double().sum()):.6e}".encode())
            h.update(flat[:8].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], captions: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"captions": json.dumps(captions)})
    os.replace(tmp, path)


class CacheSource:
    """A finished cache folder as a source: each shard is a unit; samples are read one by one (lazily)."""

    def __init__(self, path: str):
        self.root = Path(path).expanduser()
        index = self.root / INDEX
        if not index.is_file():
            hint = " (unfinished: run the same lcmkit cache command again)" if (self.root / PROGRESS).is_file() else ""
            raise ConfigError(f"--data cache:{path}: no {INDEX} in {self.root}{hint}")
        try:
            self.meta = json.loads(index.read_text())
        except ValueError:
            raise ConfigError(f"--data cache:{path}: {index} is not valid JSON") from None
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise ConfigError(f"--data cache:{path}: not an lcmkit cache of version {CACHE_VERSION}")
        self.description = f"cache:{path}"
        self.shards = [str(self.root / s["file"]) for s in self.meta["shards"]]
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise ConfigError(f"--data cache:{path}: shard {missing[0]} is missing")

    def units(self) -> list[str]:
        return list(self.shards)

    def read(self, unit: str, skip: Skip) -> Iterator[dict[str, Any]]:
        try:
            f = safe_open(unit, framework="pt")
            captions = json.loads(f.metadata()["captions"])
            slices = {k: f.get_slice(k) for k in TENSORS if k in f.keys()}
        except Exception as e:
            skip("unreadable cache shard", f"{unit} ({e})")
            return
        for i, caption in enumerate(captions):
            encoded = {k: s[i : i + 1][0] for k, s in slices.items()}
            encoded = {k: v.float() if v.is_floating_point() else v for k, v in encoded.items()}
            yield {"where": f"{unit}:{i}", "caption": caption, "encoded": encoded}

    def check_matches(self, family: str, fingerprint: str, resolution: int) -> None:
        m = self.meta
        if m["family"] != family:
            raise ConfigError(f"--data {self.description} was made for an {m['family']} teacher, this one is {family}")
        if m["fingerprint"] != fingerprint:
            raise ConfigError(
                f"--data {self.description} was made with another VAE/text encoder ({m['teacher']}): "
                "rebuild it with lcmkit cache for this teacher"
            )
        if m["resolution"] != resolution:
            raise ConfigError(
                f"--data {self.description} holds {m['resolution']} px samples, --resolution is {resolution}: "
                f"pass --resolution {m['resolution']} or rebuild the cache"
            )


def cache_settings(teacher: Any, transform: Any, dtype: str, shard_size: int, data: str) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "family": teacher.family.name, "teacher": teacher.source,
        "fingerprint": encoder_fingerprint(teacher.vae, teacher.text_encoders),
        "resolution": transform.resolution, "center_crop": transform.center_crop,
        "random_flip": transform.random_flip, "min_size": transform.min_size, "max_aspect": transform.max_aspect,
        "dtype": dtype, "shard_size": shard_size, "data": data,
        "vae_scaling_factor": float(teacher.vae.config.scaling_factor),
    }  # fmt: skip


@torch.no_grad()
def encode_batch(
    teacher: Any, conditioner: Any, batch: dict[str, Any], device: torch.device
) -> dict[str, torch.Tensor]:
    vae = teacher.vae
    dist = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
    size = tuple(batch["pixel_values"].shape[-2:])
    cond = conditioner.encode(batch["caption"], batch["original_size"], batch["crop_top_left"], size)
    out = {
        "latent_mean": dist.mean, "latent_std": dist.std, "hidden_states": cond.hidden_states,
        "original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"],
    }  # fmt: skip
    if cond.pooled is not None:
        out["pooled"] = cond.pooled
    return out


def build_cache(
    teacher: Any,
    source: Source,
    transform: Any,
    out: Path,
    data: str,
    batch_size: int = 16,
    shard_size: int = 1024,
    dtype: str = "fp16",
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Encode every usable sample of `source` once, in a fixed order, into `out`. Returns the index."""
    from tqdm.auto import tqdm

    from lcmkit.data.stream import SampleStream, SkipTally, make_dataloader

    settings = cache_settings(teacher, transform, dtype, shard_size, data)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX).is_file() and not overwrite:
        raise ConfigError(f"--out {out} already holds a finished cache: pass --overwrite to rebuild it")
    progress_file = out / PROGRESS
    done: dict[str, Any] = {"settings": settings, "shards": [], "skipped": {}}
    if progress_file.is_file() and not overwrite:
        previous = json.loads(progress_file.read_text())
        if previous.get("settings") == settings:
            done = previous
        else:
            raise ConfigError(f"--out {out} holds an unfinished cache made with other settings: "
                              "pass --overwrite to start over or choose another folder")  # fmt: skip
    if overwrite:
        for p in list(out.glob("shard-*.safetensors")) + [out / INDEX, progress_file]:
            p.unlink(missing_ok=True)
        done = {"settings": settings, "shards": [], "skipped": {}}

    from lcmkit.runtime import PRECISIONS

    store = PRECISIONS[dtype]
    teacher.vae.to(device)
    for encoder in teacher.text_encoders:
        encoder.to(device)
    conditioner = teacher.conditioner()
    stream = SampleStream(source, transform, seed=0, max_epochs=1, shuffle=False)
    already = sum(s["count"] for s in done["shards"])
    tally = SkipTally()
    pending: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(desc="caching", unit="img", disable=not progress, initial=already)

    def take(n: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Pop the first n pending samples."""
        joined = {k: torch.cat(v) for k, v in pending.items()}
        pending.clear()
        pending.update({k: [v[n:]] for k, v in joined.items()})
        head = captions[:n]
        del captions[:n]
        return {k: v[:n] for k, v in joined.items()}, head

    def flush(tensors: dict[str, torch.Tensor], shard_captions: list[str]) -> None:
        name = f"shard-{len(done['shards']):05d}.safetensors"
        tensors = {k: v.to(store) if v.is_floating_point() else v for k, v in tensors.items()}
        _save_shard(out / name, tensors, shard_captions)
        done["shards"].append({"file": name, "count": len(shard_captions)})
        done["skipped"] = tally.totals()
        write_json_atomic(progress_file, done)

    for batch in make_dataloader(stream, batch_size):
        tally.update(batch)
        n = len(batch["caption"])
        if seen + n <= already:  # resuming: these samples are in complete shards already
            seen += n
            continue
        start = max(0, already - seen)
        seen += n
        encoded = encode_batch(teacher, conditioner, batch, torch.device(device))
        for key, value in encoded.items():
            pending.setdefault(key, []).append(value[start:].cpu())
        captions.extend(batch["caption"][start:])
        bar.update(n - start)
        while len(captions) >= shard_size:
            flush(*take(shard_size))
    if captions:
        flush(*take(len(captions)))
    bar.close()
    count = sum(s["count"] for s in done["shards"])
    if count == 0:
        raise ConfigError(f"--data {data}: no usable sample to cache")
    index = {**settings, "num_samples": count, "shards": done["shards"], "skipped": tally.totals(),
             "seconds": time.perf_counter() - t0, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    write_json_atomic(out / INDEX, index)
    progress_file.unlink(missing_ok=True)
    return index
