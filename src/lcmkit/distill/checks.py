"""Refusals before any heavy work: options the machine cannot run, an output folder that holds a run, a preset
or cache made for another teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lcmkit.data.base import Source
from lcmkit.distill.config import DistillConfig, apply_defaults, list_presets
from lcmkit.errors import ConfigError
from lcmkit.families.teacher import Teacher, teacher_family
from lcmkit.outputs.record import OUTPUTS, RUN_RECORD
from lcmkit.train.checkpoint import CHECKPOINT_DIR, find_checkpoint
from lcmkit.train.sharding import fsdp_requested


def check_environment(cfg: DistillConfig) -> None:
    """Options that need hardware or packages this machine may not have."""
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU: use bf16 or no on this machine")
    if cfg.train.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to tensorboard needs tensorboard: pip install tensorboard") from None
    if cfg.optim.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes (CUDA)") from None
    check_sharding(cfg)


def check_sharding(cfg: DistillConfig) -> None:
    """FSDP (accelerate launch --use_fsdp) shards a full student, its EMA target and the teacher (docs/fsdp.md)."""
    if not fsdp_requested():
        return
    if cfg.mode != "full":
        raise ConfigError("FSDP shards full distillation: a LoRA student trains with the base weights on every "
                          "process; launch --mode lora without --use_fsdp (plain data parallel)")  # fmt: skip
    if cfg.train.validation_prompts:
        raise ConfigError("--validation-prompts with FSDP: validation grids are drawn by one process from the whole "
                          "student; drop them and sample the saved pipeline/ afterwards")  # fmt: skip


def prepare_out_dir(cfg: DistillConfig) -> Path:
    """Refuse to clobber a finished or unfinished run unless asked (nothing is removed here)."""
    out = Path(cfg.train.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if (out / "model_index.json").exists() or Path(cfg.model.teacher).expanduser().resolve() == out.resolve():
        raise ConfigError(f"--out {out} is a pipeline folder (the teacher?): choose a new folder")
    finished = (out / RUN_RECORD).is_file()
    has_checkpoint = (out / CHECKPOINT_DIR / "latest").is_file()
    if finished and not (cfg.train.resume or cfg.train.overwrite):
        raise ConfigError(f"--out {out} already holds a finished run: pass --overwrite to replace it, "
                          "--resume latest to continue it, or choose another folder")  # fmt: skip
    if has_checkpoint and not (cfg.train.resume or cfg.train.overwrite or finished):
        raise ConfigError(f"--out {out} holds an unfinished run: pass --resume latest to continue it "
                          "or --overwrite to start over")  # fmt: skip
    if cfg.train.resume and cfg.train.resume != "latest":
        try:
            find_checkpoint(out, cfg.train.resume)
        except FileNotFoundError as e:
            raise ConfigError(f"--resume {cfg.train.resume}: {e}") from None
    return out


def clear_outputs(out: Path) -> None:
    """--overwrite: remove lcmkit's own files from --out (and nothing else)."""
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def check_family(cfg: DistillConfig) -> None:
    """Before loading anything: the teacher's family (cheap: its model_index.json or file keys) fills the family's
    defaults and refuses what it cannot train; the preset may be for another family."""
    _, family = teacher_family(cfg.model)
    apply_defaults(cfg, family)
    check_preset_family(cfg, family.name)


def check_preset_family(cfg: DistillConfig, family: str) -> None:
    """The preset may name a VAE for another family."""
    if not cfg.preset:
        return
    meant = list_presets()[cfg.preset].get("family")
    if meant and meant != family:
        names = ", ".join(n for n, p in list_presets().items() if p.get("family") == family)
        raise ConfigError(f"--preset {cfg.preset} is for {meant.upper()} teachers, but {cfg.model.teacher} is "
                          f"{family.upper()}: use one of {names}")  # fmt: skip


def check_cache(source: Source, teacher: Teacher, resolution: int) -> None:
    """A cache must come from this teacher's VAE and text encoder(s), at this resolution."""
    from lcmkit.data.cache import CacheSource, encoder_fingerprint

    if isinstance(source, CacheSource):
        source.check_matches(teacher.family.name, encoder_fingerprint(teacher.vae, teacher.text_encoders), resolution)
