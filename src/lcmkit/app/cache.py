"""`lcmkit cache`: the model and data flags of distill (distill/config.py's add_flags), plus CacheOptions."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Literal

from lcmkit.app.flags import Flags, default_of, option
from lcmkit.data.cache import build_cache
from lcmkit.distill.config import add_flags
from lcmkit.errors import ConfigError
from lcmkit.runtime import pick_device


@dataclass
class CacheOptions:
    """How the cache is written (the teacher and the data are distill's --config / flags)."""

    out: str
    """Cache folder."""
    batch_size: int = default_of(build_cache, "batch_size")
    """Images encoded at once."""
    shard_size: int = default_of(build_cache, "shard_size")
    """Samples per cache shard."""
    dtype: Literal["fp16", "fp32", "bf16"] = default_of(build_cache, "dtype")
    """Storage precision."""
    device: str = default_of(pick_device, "device")
    """auto, cuda, mps or cpu."""
    overwrite: bool = option(default_of(build_cache, "overwrite"), action="store_true")
    """Rebuild a finished cache."""
    progress: bool = option(default_of(build_cache, "progress"), action="store_false")
    """Show no progress bar."""


CACHE = Flags(CacheOptions)
NOT_OPTIONS = ("config", "command", "func", "verbose", *(f.name for f in fields(CacheOptions)))
"""Parsed arguments that are not model or data options of distill."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("cache", help="encode a data source once (VAE latents + text embeddings) for fast steps",
                              description="Model and data options as for distill (same --config works); the result "
                              "is used with --data cache:OUT.")  # fmt: skip
    add_flags(p, sections=("model", "data"))
    CACHE.add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcmkit.data import ImageTransform, resolve_data, summarize_skips
    from lcmkit.distill.config import load_config, validate
    from lcmkit.families.teacher import load_teacher

    o: CacheOptions = CACHE.build(args)
    cfg = load_config(args.config, {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS})
    cfg.train.out = o.out
    validate(cfg)
    for name in ("batch_size", "shard_size"):
        if getattr(o, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be >= 1")
    d = cfg.data
    source = resolve_data(d.data, d.image_column, d.caption_column)
    out = Path(o.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "cache.json").exists() and not any(out.glob("cache*.json")):
        raise ConfigError(f"--out {out} is a non-empty folder that is not a cache: choose a new folder")
    teacher = load_teacher(cfg.model)
    transform = ImageTransform(d.resolution, d.center_crop, d.random_flip, d.min_size, d.max_aspect)
    index = build_cache(teacher, source, transform, out, d.data, o.batch_size, o.shard_size, o.dtype, o.overwrite,
                        progress=o.progress, device=pick_device(o.device))  # fmt: skip
    print(f"lcmkit: cached {index['num_samples']} samples in {len(index['shards'])} shard(s) "
          f"({summarize_skips(index['skipped'])}) in {index['seconds']:.0f} s -> {out}; "
          f"train with --data cache:{out}")  # fmt: skip
    return 0
