"""Load a teacher (diffusers folder, hub id or single file) and tell its family."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcmkit.core.schedule import NoiseSchedule
from lcmkit.errors import ConfigError
from lcmkit.errors import first_line as _first_line
from lcmkit.families import families_text, family_of_components, get_family
from lcmkit.families.base import Family
from lcmkit.families.conditioning import TextConditioner
from lcmkit.runtime import dtype_kwarg
from lcmkit.safe_load import check_weights_folder, is_pickle, refuse_pickle, weights_file


@dataclass
class ModelConfig:
    """The [model] options: which teacher, and how to read it."""

    teacher: str = ""
    """Hub id, local diffusers folder, or a single .safetensors checkpoint."""
    revision: str | None = None
    """A hub revision (branch, tag or commit) of the teacher."""
    variant: str | None = None
    """A weights variant of the teacher folder, e.g. fp16."""
    vae: str | None = None
    """A separate VAE (hub id or folder), e.g. an fp16-safe SDXL VAE."""
    teacher_config: str | None = None
    """For a single-file teacher: a diffusers folder or hub id holding the matching configs."""
    family: str | None = None
    """The model family (sd, sdxl: lcmkit.families); detected from the teacher when not given."""
    allow_pickle: bool = False
    """Read pickle-based weights (.ckpt, .pt, .bin) at all; even then only with torch.load(weights_only=True)."""


@dataclass
class Teacher:
    """The teacher's components, frozen, and where they came from."""

    family: Family
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    def noise_schedule(self) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(self.scheduler.config)
        return NoiseSchedule(ddpm.alphas_cumprod.float())

    def conditioner(self) -> TextConditioner:
        return TextConditioner(self.family, self.tokenizers, self.text_encoders)

    def default_uncond(self) -> str:
        """The unconditional embedding the teacher's pipeline uses for an empty negative prompt."""
        flag = self.family.zeros_uncond_flag
        return "zeros" if flag and self.extra.get(flag) else "empty"

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and not os.path.exists(spec)


def detect_family(spec: str, revision: str | None = None) -> Family:
    """The family of a teacher from a folder's model_index.json, a hub id's, or a single file's keys."""
    path = Path(spec).expanduser()
    if path.is_file():
        from lcmkit.families.single_file import file_family

        return file_family(path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ConfigError(f"teacher {spec} is not a diffusers pipeline folder (no model_index.json)")
        info = json.loads(index.read_text())
    else:
        from diffusers import DiffusionPipeline

        try:
            info = DiffusionPipeline.load_config(spec, revision=revision)
        except Exception as e:
            raise ConfigError(f"could not read teacher {spec!r} from the hub: {_first_line(e)}") from None
    name = str(info.get("_class_name", ""))
    family = family_of_components(info)
    if family is None or "unet" not in info:
        raise ConfigError(f"teacher {spec} is a {name or 'pipeline'} without text_encoder/unet: not a "
                          f"{families_text()} model")  # fmt: skip
    return family


def load_teacher(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Teacher:
    """Load the teacher pipeline's components (no safety checker)."""
    spec = cfg.teacher
    path = Path(spec).expanduser()
    if is_pickle(path) and not cfg.allow_pickle:
        raise refuse_pickle(spec, "teacher")
    if not path.exists() and not looks_like_hub_id(spec):
        raise ConfigError(f"teacher {spec} does not exist (give a diffusers folder, a .safetensors file or a hub id)")
    if path.is_file():  # checked (or, allowed, unpickled without code) before anyone reads it
        path = weights_file(path, "teacher", cfg.allow_pickle)
    elif path.is_dir():
        check_weights_folder(path, "teacher", cfg.allow_pickle)
    try:
        family = get_family(cfg.family) if cfg.family else detect_family(str(path) if path.is_file() else spec,
                                                                          cfg.revision)  # fmt: skip
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"could not read teacher {spec}: {_first_line(e)}") from None
    cls = family.pipeline_class()
    # Without --allow-pickle, diffusers and transformers may read safetensors only (also from the hub).
    safetensors_only = None if cfg.allow_pickle else True
    kwargs: dict[str, Any] = dtype_kwarg(dtype)
    kwargs.update({k: v for k, v in family.pipeline_kwargs.items() if k != "feature_extractor"})
    if cfg.vae:
        from diffusers import AutoencoderKL

        vae_path = Path(cfg.vae).expanduser()
        sub = "vae" if (vae_path / "vae").is_dir() else None
        if vae_path.is_dir():
            check_weights_folder(vae_path, "--vae", cfg.allow_pickle)
        elif vae_path.is_file():
            raise ConfigError(f"--vae {cfg.vae}: give a diffusers VAE folder (or a hub id), not a single file")
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(
                cfg.vae, subfolder=sub, use_safetensors=safetensors_only, **dtype_kwarg(dtype)
            )
        except Exception as e:
            raise ConfigError(f"could not load --vae {cfg.vae}: {_first_line(e)}") from None
    try:
        if path.is_file() and cfg.teacher_config:
            from lcmkit.families.single_file import import_single_file

            rest = {k: v for k, v in kwargs.items() if k not in ("dtype", "torch_dtype")}
            pipe = import_single_file(path, cfg.teacher_config, family, dtype=dtype, **rest)
        elif path.is_file():  # configs come from the hub
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            pipe = cls.from_pretrained(
                spec, revision=cfg.revision, variant=cfg.variant, use_safetensors=safetensors_only, **kwargs
            )
    except Exception as e:
        raise ConfigError(f"could not load teacher {spec}: {_first_line(e)}") from None
    encoders = [getattr(pipe, name) for name in family.text_encoders]
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    for module in [pipe.unet, pipe.vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
    flag = family.zeros_uncond_flag
    extra = {flag: pipe.config.get(flag, True)} if flag else {}
    return Teacher(family, pipe.unet, pipe.vae, encoders, tokenizers, pipe.scheduler, spec, extra)
