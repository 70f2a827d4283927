"""Every option of `lcmkit distill`, as dataclasses, loaded from TOML and flags, validated in one place.

Precedence: dataclass defaults < TOML file < command-line flags. Every field of every section is
also a flag: `--w-min 3`, `--lora-rank 8`, `--validation-prompts "a" "b"`. A TOML file may use the
sections below ([lcd], [lora], ...) or put keys at top level."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmkit.data.config import DataConfig
from lcmkit.errors import ConfigError
from lcmkit.families import FAMILIES
from lcmkit.families.base import Family
from lcmkit.families.conditioning import ConditioningSettings
from lcmkit.families.models import LoraConfig, StudentSettings
from lcmkit.families.teacher import ModelConfig
from lcmkit.fields import field_docs
from lcmkit.methods import METHODS
from lcmkit.methods.adversarial import AdversarialSettings
from lcmkit.methods.lcd import LCDSettings
from lcmkit.methods.tcd import PCMSettings
from lcmkit.train.loop import LoopSettings
from lcmkit.train.optim import LR_SCHEDULERS, OptimConfig


@dataclass
class LCDConfig(LCDSettings, StudentSettings, ConditioningSettings):
    """The [lcd] section: the method's settings, and how the student, its target and the unconditional branch are
    built. Each field is defined (with its default) by the part that owns it."""


@dataclass
class TrainConfig(LoopSettings):
    """The [train] section: the loop's settings (train/loop.py) and how this run computes, checks and reports."""

    out: str = ""
    """Output folder: weights, checkpoints, logs, model card."""
    overwrite: bool = False
    """Replace the outputs of a previous run in --out (its checkpoints too)."""
    resume: str | None = None
    """'latest' or a checkpoint folder."""
    mixed_precision: str = "no"
    """no, fp16 (CUDA) or bf16: the precision the step computes in (weights that train stay fp32)."""
    teacher_precision: str = "auto"
    """Storage of the frozen teacher UNet: auto (that of --mixed-precision), fp32, bf16 or fp16. A half-precision
    teacher under --mixed-precision no computes in fp32, one layer at a time (diffusers' layerwise casting).
    Full mode only: in LoRA mode the teacher is the student's own base weights."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in the backward pass: less memory, ~30% more time."""
    attention: str = "sdpa"
    """sdpa (torch's scaled_dot_product_attention) or default (diffusers' plain attention)."""
    cpu_conv: str = "auto"
    """CPU convolution kernels: onednn, native (faster for tiny work) or auto (native for a UNet below 50M
    parameters called on at most 2,048 latent positions)."""
    channels_last: str = "auto"
    """UNet memory layout: on (channels_last), off, or auto (on for CUDA, where convolutions run faster in it;
    off on CPU, where it measured slower)."""
    compile: bool = False
    """torch.compile the UNets of the step (student, teacher, target): a faster step after a one-off compile of
    minutes on a CPU (a new batch shape compiles again); worth it for long runs."""
    seed: int = 0
    """Seeds data order, noise, timesteps and w: the same seed gives the same run."""
    validation_every: int = 0
    """Save a grid of validation images every this many steps (0: never)."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts of the validation grid."""
    validation_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Sampling steps shown in the validation grid."""
    watch_quality: bool = False
    """At each validation, score the student at --validation-steps against the teacher's 50-step images of the same
    prompts and seeds (PSNR, 1 - MS-SSIM), log it, and keep the best-scoring weights in best/ beside the last."""
    report_to: str = "none"
    """none, tensorboard or wandb."""
    push_to_hub: bool = False
    """Upload the finished outputs (weights, model card, run record, grids) with your huggingface_hub login."""
    hub_model_id: str | None = None
    """The repo for --push-to-hub (default: the --out folder's name under your account)."""
    hub_private: bool = False
    """Make the --push-to-hub repo private."""


@dataclass
class DistillConfig:
    mode: str = "lora"
    """full (a few-step model of its own) or lora (an adapter for the teacher and its fine-tunes)."""
    method: str = "lcd"
    """The distillation method (lcmkit.methods)."""
    preset: str | None = None
    """A shipped preset (lcmkit presets): its values sit under the config file's and the flags'."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lcd: LCDConfig = field(default_factory=LCDConfig)
    pcm: PCMSettings = field(default_factory=PCMSettings)
    adversarial: AdversarialSettings = field(default_factory=AdversarialSettings)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "lcd", "pcm", "adversarial", "lora", "optim", "data", "train")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(DistillConfig)
    return {name: hints[name] for name in SECTIONS}


def _section_fields() -> dict[str, str]:
    """Field name -> section name, for every option (names are unique across sections)."""
    return {f.name: section for section, cls in _sections().items() for f in dataclasses.fields(cls)}


def _field_types() -> dict[str, Any]:
    types_: dict[str, Any] = {}
    for cls in _sections().values():
        types_.update(typing.get_type_hints(cls))
    return types_


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) of an annotation like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _field_docs() -> dict[str, str]:
    """Field name -> the first sentence of its attribute docstring, for every section."""
    docs: dict[str, str] = {}
    for cls in _sections().values():
        docs.update(field_docs(cls))
    return docs


def _defaults() -> dict[str, Any]:
    values = {}
    for cls in _sections().values():
        instance = cls()
        values.update({f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)})
    return values


def add_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = SECTIONS) -> None:
    """One flag per option of `sections`; defaults are None so that unset flags do not override the file."""
    parser.add_argument("--config", help="TOML file with options (flags override it)")
    if sections == SECTIONS:
        parser.add_argument("--mode", choices=["full", "lora"], default=None)
        parser.add_argument("--method", choices=sorted(METHODS), default=None, help="the distillation method [lcd]")
        parser.add_argument("--preset", default=None, help="start from a shipped preset (see: lcmkit presets)")
    owner, docs, defaults = _section_fields(), _field_docs(), _defaults()
    for name, tp in _field_types().items():
        if owner[name] not in sections:
            continue
        base, is_list = _base_type(tp)
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        shown = "" if default in (None, "", []) else f"; default {' '.join(map(str, default)) if is_list else default}"
        group = ((f"{docs[name]} " if name in docs else "") + f"[{owner[name]}{shown}]").replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=group)
        elif is_list:
            parser.add_argument(flag, nargs="+", type=base, default=None, help=group)
        else:
            parser.add_argument(flag, type=base, default=None, help=group, metavar=base.__name__.upper())


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base, is_list = _base_type(tp)
    if value is None:
        return None
    try:
        if is_list:
            if not isinstance(value, list):
                value = [value]
            return [base(v) for v in value]
        if base is bool and not isinstance(value, bool):
            raise TypeError
        if base is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, base):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"option {name} = {value!r}: expected {getattr(base, '__name__', base)}") from None


PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> dict[str, dict[str, Any]]:
    """name -> the preset's [preset] table (description, family) plus its mode and file."""
    out = {}
    for file in sorted(PRESETS_DIR.glob("*.toml")):
        data = tomllib.loads(file.read_text())
        out[file.stem] = {**data.get("preset", {}), "mode": data.get("mode", "lora"), "path": str(file)}
    return out


def preset_file(name: str) -> Path:
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"--preset {name}: no such preset (choose one of {', '.join(presets)})")
    return Path(presets[name]["path"])


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None


def _flatten_toml(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Sections or flat keys -> {option: value}; unknown options are errors."""
    owner = _section_fields()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if owner.get(k) != key:
                    raise ConfigError(f"{where}: unknown option [{key}] {k}")
                flat[k] = v
        elif key in ("mode", "method", "preset") or key in owner:
            flat[key] = value
        else:
            raise ConfigError(f"{where}: unknown option {key}")
    return flat


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults, then the preset (from the flags or the file), then the TOML file, then `overrides` (flat option
    names, None = not given)."""
    cfg = DistillConfig()
    owner = _section_fields()
    types_ = _field_types()
    given = _flatten_toml(_read_toml(path, "config file"), f"config file {path}") if path else {}
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    flat: dict[str, Any] = {}
    if given.get("preset"):
        preset = preset_file(given["preset"])
        data = _read_toml(preset, "preset")
        data.pop("preset", None)
        flat.update(_flatten_toml(data, f"preset {preset}"))
    flat.update(given)
    for key, value in flat.items():
        if key in ("mode", "method", "preset"):
            setattr(cfg, key, value)
            continue
        setattr(getattr(cfg, owner[key]), key, _coerce(key, value, types_[key]))
    return cfg


def validate(cfg: DistillConfig) -> DistillConfig:
    """Every cross-field check, in one place. Raises ConfigError with one clear line."""
    if cfg.mode not in ("full", "lora"):
        raise ConfigError(f"--mode {cfg.mode!r}: choose full or lora")
    if cfg.method not in METHODS:
        raise ConfigError(f"--method {cfg.method!r}: choose one of {', '.join(sorted(METHODS))}")
    adv = cfg.adversarial
    d_lr = adv.discriminator_lr
    if adv.adversarial_weight < 0 or adv.adversarial_warmup < 0 or (d_lr is not None and d_lr <= 0):
        raise ConfigError("--adversarial-weight and --adversarial-warmup must be >= 0 and --discriminator-lr > 0")
    if adv.adversarial_loss not in ("hinge", "nonsaturating"):
        raise ConfigError(f"--adversarial-loss {adv.adversarial_loss!r}: choose hinge or nonsaturating")
    if adv.adversarial_real not in ("data", "target"):
        raise ConfigError(f"--adversarial-real {adv.adversarial_real!r}: choose data or target")
    if cfg.method == "pcm" and not 1 <= cfg.pcm.num_phases <= cfg.lcd.num_ddim_timesteps:
        raise ConfigError(f"--num-phases {cfg.pcm.num_phases}: must be between 1 and --num-ddim-timesteps "
                          f"({cfg.lcd.num_ddim_timesteps})")  # fmt: skip
    if not cfg.model.teacher:
        raise ConfigError("no teacher given: pass --teacher (hub id, diffusers folder or .safetensors file)")
    if cfg.model.family is not None and cfg.model.family not in FAMILIES:
        raise ConfigError(f"--family {cfg.model.family!r}: choose {' or '.join(FAMILIES)}")
    if not cfg.data.data:
        raise ConfigError("no data given: pass --data, e.g. --data '/shards/{00000..00099}.tar'")
    if not cfg.train.out:
        raise ConfigError("no output folder given: pass --out DIR")
    lcd = cfg.lcd
    if lcd.w_min is not None and lcd.w_max is not None and lcd.w_min > lcd.w_max:
        raise ConfigError(f"--w-min {lcd.w_min} is greater than --w-max {lcd.w_max}: w_min must be <= w_max")
    if lcd.w_min is not None and lcd.w_min < 0:
        raise ConfigError(f"--w-min {lcd.w_min} is negative: guidance scales must be >= 0")
    if not 1 <= lcd.num_ddim_timesteps <= 1000:
        raise ConfigError(f"--num-ddim-timesteps {lcd.num_ddim_timesteps}: must be between 1 and 1000")
    if lcd.loss not in ("huber", "l2"):
        raise ConfigError(f"--loss {lcd.loss!r}: choose huber or l2")
    if lcd.huber_c <= 0:
        raise ConfigError(f"--huber-c {lcd.huber_c}: must be > 0")
    if not 0 <= lcd.ema_decay < 1:
        raise ConfigError(f"--ema-decay {lcd.ema_decay}: must be in [0, 1)")
    if lcd.uncond not in ("auto", "empty", "zeros"):
        raise ConfigError(f"--uncond {lcd.uncond!r}: choose auto, empty or zeros")
    if cfg.lora.lora_rank < 1:
        raise ConfigError(f"--lora-rank {cfg.lora.lora_rank}: must be >= 1")
    if cfg.lora.init_lora and cfg.mode != "lora":
        raise ConfigError(f"--init-lora {cfg.lora.init_lora}: starting from a LoRA needs --mode lora")
    if cfg.lora.lora_target_modules is not None and not cfg.lora.lora_target_modules:
        raise ConfigError("--lora-target-modules is empty: name at least one module")
    tr = cfg.train
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(tr, name)}: must be >= 1")
    if tr.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"--mixed-precision {tr.mixed_precision!r}: choose no, fp16 or bf16")
    if tr.teacher_precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--teacher-precision {tr.teacher_precision!r}: choose auto, fp32, bf16 or fp16")
    if tr.teacher_precision != "auto" and cfg.mode != "full":
        raise ConfigError(
            f"--teacher-precision {tr.teacher_precision}: only for --mode full (in LoRA mode the teacher is the "
            "student's base weights, stored as --mixed-precision says)"
        )
    if cfg.optim.optimizer not in ("adamw", "adafactor"):
        raise ConfigError(f"--optimizer {cfg.optim.optimizer!r}: choose adamw or adafactor")
    if tr.cpu_conv not in ("auto", "onednn", "native"):
        raise ConfigError(f"--cpu-conv {tr.cpu_conv!r}: choose auto, onednn or native")
    if tr.channels_last not in ("auto", "on", "off"):
        raise ConfigError(f"--channels-last {tr.channels_last!r}: choose auto, on or off")
    if tr.attention not in ("sdpa", "default"):
        raise ConfigError(f"--attention {tr.attention!r}: choose sdpa or default")
    if tr.report_to not in ("none", "tensorboard", "wandb"):
        raise ConfigError(f"--report-to {tr.report_to!r}: choose tensorboard, wandb or none")
    if tr.profile_steps < 0:
        raise ConfigError(f"--profile-steps {tr.profile_steps}: must be >= 0")
    if tr.max_nonfinite_steps < 1:
        raise ConfigError(f"--max-nonfinite-steps {tr.max_nonfinite_steps}: must be >= 1")
    if tr.checkpoint_every < 0 or tr.validation_every < 0:
        raise ConfigError("--checkpoint-every and --validation-every must be >= 0 (0 turns them off)")
    if tr.watch_quality and not tr.validation_every:
        raise ConfigError("--watch-quality scores the student at each validation: set --validation-every N "
                          "(and --validation-prompts)")  # fmt: skip
    if tr.validation_every and not tr.validation_prompts:
        raise ConfigError("--validation-every is set but no --validation-prompts were given")
    if any(s < 1 for s in tr.validation_steps):
        raise ConfigError(f"--validation-steps {tr.validation_steps}: every step count must be >= 1")
    if cfg.data.resolution < 8 or cfg.data.resolution % 8:
        raise ConfigError(f"--resolution {cfg.data.resolution}: must be a positive multiple of 8")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"--num-workers {cfg.data.num_workers}: must be >= 0")
    if cfg.data.min_size < 0:
        raise ConfigError(f"--min-size {cfg.data.min_size}: must be >= 0")
    if cfg.data.max_aspect and cfg.data.max_aspect < 1:
        raise ConfigError(f"--max-aspect {cfg.data.max_aspect}: must be >= 1 (long side / short side), or 0 for off")
    if not 0 <= cfg.data.caption_dropout < 1:
        raise ConfigError(f"--caption-dropout {cfg.data.caption_dropout}: must be in [0, 1)")
    if cfg.optim.learning_rate <= 0:
        raise ConfigError(f"--learning-rate {cfg.optim.learning_rate}: must be > 0")
    if cfg.optim.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"--lr-scheduler {cfg.optim.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    return cfg




def apply_defaults(cfg: DistillConfig, family: Family) -> None:
    """Fill the options whose default is the family's (the w range, the LoRA targets) or the method's (the
    discriminator's learning rate), and refuse what the family's student cannot learn: a full student without a
    guidance input (SD3's transformer) learns one w, baked in."""
    lcd = cfg.lcd
    lo, hi = family.guidance_range
    lcd.w_min = lo if lcd.w_min is None else lcd.w_min
    lcd.w_max = max(hi, lcd.w_min) if lcd.w_max is None else lcd.w_max
    if cfg.lora.lora_target_modules is None:
        cfg.lora.lora_target_modules = list(family.lora_targets)
    validate(cfg)
    if cfg.adversarial.discriminator_lr is None:
        cfg.adversarial.discriminator_lr = METHODS[cfg.method].discriminator_lr
    if cfg.mode == "full" and not family.full_student_takes_w and lcd.w_min != lcd.w_max:
        raise ConfigError(f"--mode full with w in [{lcd.w_min:g}, {lcd.w_max:g}]: a full {family.label} student has no "
                          f"guidance input ({family.denoiser} in diffusers), so it learns one guidance scale: set "
                          "--w-min and --w-max to the same value (e.g. 3.5), or distill a LoRA (--mode lora)")
