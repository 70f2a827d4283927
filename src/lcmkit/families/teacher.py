"""Load a teacher (diffusers folder, hub id or single file) and tell its family."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcmkit.core.flow import FlowSchedule
from lcmkit.core.schedule import NoiseSchedule
from lcmkit.core.trajectory import DiffusionTrajectory, FlowTrajectory, Trajectory
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
    denoiser: nn.Module
    """The family's denoiser: a UNet, or a flow transformer."""
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction or sample; "flow" (the velocity eps - x0) for a rectified-flow teacher."""
        if self.family.flow:
            return "flow"
        return self.scheduler.config.get("prediction_type", "epsilon")

    def noise_schedule(self) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(self.scheduler.config)
        return NoiseSchedule(ddpm.alphas_cumprod.float())

    def flow_shift(self, resolution: int) -> float:
        """The shift of a flow teacher's sigmas at this resolution: its fixed `shift`, or with dynamic shifting
        (FLUX) exp(mu), mu linear in the number of image tokens as its pipeline computes it."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return float(config.get("shift", 1.0))
        tokens = (resolution // self.vae_downsampling // 2) ** 2
        lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        return math.exp(base + (top - base) * (tokens - lo) / (hi - lo))

    def trajectory(self, resolution: int) -> Trajectory:
        """The teacher's ODE as a method sees it (core/trajectory.py)."""
        if self.family.flow:
            return FlowTrajectory(FlowSchedule(self.flow_shift(resolution)))
        return DiffusionTrajectory(self.noise_schedule(), self.prediction_type)

    @property
    def vae_downsampling(self) -> int:
        blocks = getattr(getattr(self.vae, "config", None), "block_out_channels", None)
        return 2 ** (len(blocks) - 1) if blocks else 8

    def conditioner(self) -> TextConditioner:
        return TextConditioner(self.family, self.tokenizers, self.text_encoders)

    def default_uncond(self) -> str:
        """The unconditional embedding the teacher's pipeline uses for an empty negative prompt."""
        flag = self.family.zeros_uncond_flag
        return "zeros" if flag and self.extra.get(flag) else "empty"

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_shift_factor(self) -> float | None:
        """Subtracted from a latent before scaling (the 16-channel VAEs of SD3 and FLUX)."""
        shift = getattr(self.vae.config, "shift_factor", None)
        return float(shift) if shift is not None else None


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
    family = family_of_components(info, name)
    if family is None:
        raise ConfigError(f"teacher {spec} is a {name or 'pipeline'} without text_encoder/unet/transformer: not a "
                          f"{families_text()} model")  # fmt: skip
    if path.is_dir():
        check_components(path, info, family)
    return family


def check_components(folder: Path, info: dict[str, Any], family: Family) -> None:
    """Every component the family needs is in the pipeline folder (e.g. a FLUX folder saved without its T5)."""
    needed = (family.denoiser, "vae", *family.text_encoders, *family.tokenizers)
    for name in needed:
        entry = info.get(name)
        if not entry or entry[0] is None or not (folder / name).is_dir():
            what = f"{name} ({family.text_encoder_labels[name]})" if name in family.text_encoder_labels else name
            raise ConfigError(f"teacher {folder} has no {what}: a {family.label} pipeline folder needs "
                              f"{', '.join(needed)}; save the complete pipeline (or give its hub id)")  # fmt: skip


def teacher_family(cfg: ModelConfig) -> tuple[Path, Family]:
    """(the teacher's path, its family), reading no weights: a pickle file is refused unless allowed, a missing one
    named; the family is --family or detected from the folder's model_index.json, the hub's, or the file's keys."""
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
    config = path / family.denoiser / "config.json"
    if family.check_teacher is not None and config.is_file():
        family.check_teacher(json.loads(config.read_text()), spec)
    return path, family


def flow_single_file_teacher(
    path: Path, cfg: ModelConfig, family: Family, dtype: torch.dtype, kwargs: dict[str, Any]
) -> Teacher:
    """An SD3/FLUX single file (the transformer, in its original or in diffusers' layout: diffusers reads both)
    with the rest of the pipeline (text encoders, VAE, scheduler, configs) from --teacher-config."""
    if not cfg.teacher_config:
        raise ConfigError(f"teacher {cfg.teacher} is a single {family.label} file: pass --teacher-config, the "
                          "diffusers folder or hub id of the same model (its text encoders, VAE and configs)")
    try:
        import diffusers

        config = cfg.teacher_config
        index = (Path(config) / "model_index.json") if Path(config).is_dir() else None
        info = json.loads(index.read_text()) if index else diffusers.DiffusionPipeline.load_config(config)
        cls = getattr(diffusers, info[family.denoiser][1])
        net = cls.from_single_file(str(path), config=config, subfolder=family.denoiser, **dtype_kwarg(dtype))
        safetensors_only = None if cfg.allow_pickle else True
        pipe = family.pipeline_class().from_pretrained(config, use_safetensors=safetensors_only,
                                                       **{family.denoiser: net}, **kwargs)  # fmt: skip
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"could not load teacher {cfg.teacher} with --teacher-config {cfg.teacher_config}: "
                          f"{_first_line(e)}") from None
    return teacher_of(pipe, family, cfg.teacher)


def load_teacher(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Teacher:
    """Load the teacher pipeline's components (no safety checker)."""
    spec = cfg.teacher
    path, family = teacher_family(cfg)
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
    if path.is_file() and family.flow:
        return flow_single_file_teacher(path, cfg, family, dtype, kwargs)
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
    return teacher_of(pipe, family, spec)


def teacher_of(pipe: Any, family: Family, spec: str) -> Teacher:
    """The frozen Teacher of a loaded pipeline (refused when the family cannot distill it)."""
    if family.check_teacher is not None:
        family.check_teacher(getattr(pipe, family.denoiser).config, spec)
    encoders = [getattr(pipe, name) for name in family.text_encoders]
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    denoiser = getattr(pipe, family.denoiser)
    for module in [denoiser, pipe.vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
    flag = family.zeros_uncond_flag
    extra = {flag: pipe.config.get(flag, True)} if flag else {}
    return Teacher(family, denoiser, pipe.vae, encoders, tokenizers, pipe.scheduler, spec, extra)
