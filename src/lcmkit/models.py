"""Load a teacher (diffusers folder, hub id or single file) and build the student, teacher and target.

Full LCD vs LCM-LoRA is decided here and nowhere else: `build_lcd_models` returns three callables
with the same signature, and the loss never learns which mode it trains.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import Conditioning, TextConditioner
from .config import ConfigError, LCDConfig, LoraConfig, ModelConfig
from .lcd import NoiseSchedule, guidance_scale_embedding
from .safe_load import check_weights_folder, is_pickle, refuse_pickle, weights_file
from .safe_load import first_line as _first_line

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The precision names of every --dtype-like option."""


def pipeline_class(family: str) -> type:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


@dataclass
class Teacher:
    """The teacher's components, frozen, and where they came from."""

    family: str
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
        return "zeros" if self.extra.get("force_zeros_for_empty_prompt") else "empty"

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """diffusers' loading dtype keyword: `dtype` from 0.40 (where `torch_dtype` warns), `torch_dtype` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype": dtype} if Version(diffusers.__version__).release >= (0, 40) else {"torch_dtype": dtype}


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and not os.path.exists(spec)


def detect_family(spec: str, revision: str | None = None) -> str:
    """'sdxl' or 'sd' from a folder's model_index.json, a hub id's, or a single file's keys."""
    path = Path(spec).expanduser()
    if path.is_file():
        from .single_file import file_family

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
    if "text_encoder" not in info or "unet" not in info:
        raise ConfigError(f"teacher {spec} is a {name or 'pipeline'} without text_encoder/unet: not a SD/SDXL model")
    return "sdxl" if "XL" in name or "text_encoder_2" in info else "sd"


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
        family = cfg.family or detect_family(str(path) if path.is_file() else spec, cfg.revision)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"could not read teacher {spec}: {_first_line(e)}") from None
    cls = pipeline_class(family)
    # Without --allow-pickle, diffusers and transformers may read safetensors only (also from the hub).
    safetensors_only = None if cfg.allow_pickle else True
    kwargs: dict[str, Any] = dtype_kwarg(dtype)
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
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
            from .single_file import import_single_file

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
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for module in [pipe.unet, pipe.vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
    extra = {}
    if family == "sdxl":
        extra["force_zeros_for_empty_prompt"] = pipe.config.get("force_zeros_for_empty_prompt", True)
    return Teacher(family, pipe.unet, pipe.vae, encoders, tokenizers, pipe.scheduler, spec, extra)


def unet_call(
    unet: nn.Module, z_t: Tensor, t: Tensor, cond: Conditioning, timestep_cond: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """The UNet's output for inputs cast to `dtype` (default: its weights' dtype)."""
    dtype = dtype or next(unet.parameters()).dtype
    if timestep_cond is not None:
        timestep_cond = timestep_cond.to(dtype)
    return unet(z_t.to(dtype), t, timestep_cond=timestep_cond, **cond.to(dtype=dtype).unet_kwargs()).sample


class TrainableState:
    """state_dict of only the parameters that train (LoRA weights, or the whole full student)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.module.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        if missing:
            raise ConfigError(
                f"checkpoint does not match this model: missing {missing[0]} (and {len(missing) - 1} more)"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


@dataclass
class LCDModels:
    """Student, teacher and target behind one signature; plus what trains and what to checkpoint."""

    mode: str
    student_unet: nn.Module
    target_unet: nn.Module | None  # full: the EMA copy; LoRA: None (the target is the student)
    teacher_unet: nn.Module
    guidance_embed_dim: int
    ema_decay: float
    teacher_dtype: torch.dtype = torch.float32
    """What the teacher computes in (its weights may be stored in less: see store_teacher)."""
    target_autocast: torch.dtype | None = None
    """Full mode under mixed precision: the fp32 target computes in this dtype."""

    def student_forward(self, unet: nn.Module | None = None):
        """The student callable; `unet` may be the accelerate-wrapped module (DDP)."""
        unet = unet or self.student_unet
        if self.mode == "full":
            return lambda z, t, c, w: unet_call(unet, z, t, c, guidance_scale_embedding(w, self.guidance_embed_dim))
        return lambda z, t, c, w: unet_call(unet, z, t, c)

    def teacher(self, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return unet_call(self.teacher_unet, z_t, t, cond, dtype=self.teacher_dtype)

    def target(self, z_t: Tensor, t: Tensor, cond: Conditioning, w: Tensor) -> Tensor:
        if self.mode != "full":
            return unet_call(self.student_unet, z_t, t, cond)
        w_embedding = guidance_scale_embedding(w, self.guidance_embed_dim)
        dtype = self.target_autocast
        with torch.autocast(z_t.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return unet_call(self.target_unet, z_t, t, cond, w_embedding)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student_unet.parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self) -> None:
        """theta- <- decay theta- + (1 - decay) theta (full LCD only)."""
        if self.target_unet is None:
            return
        torch._foreach_lerp_(list(self.target_unet.parameters()), list(self.student_unet.parameters()),
                             1.0 - self.ema_decay)  # fmt: skip

    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"student": TrainableState(self.student_unet)}
        if self.target_unet is not None:
            state["target"] = self.target_unet
        return state


def make_full_student(teacher_unet: nn.Module, guidance_embed_dim: int) -> nn.Module:
    """A copy of the teacher UNet with time_cond_proj_dim set: w enters through timestep_cond."""
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    config["time_cond_proj_dim"] = guidance_embed_dim
    student = UNet2DConditionModel.from_config(config).to(teacher_unet.dtype)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    # Zero init: the student starts as exactly the teacher, and w is learned from there.
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def lora_config(cfg: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
        target_modules=list(cfg.lora_target_modules),
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian",
    )


def build_lcd_models(
    teacher: Teacher, mode: str, lcd: LCDConfig, lora: LoraConfig, frozen_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", teacher_storage: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> LCDModels:  # fmt: skip
    """Full: student = teacher + w input (fp32, trains), target = EMA of it (fp32, computed in frozen_dtype),
    teacher frozen (stored in teacher_storage, default frozen_dtype: see store_teacher).
    LoRA: one set of UNet weights: student = teacher + adapters, teacher = a plain view of the base weights
    (= adapters disabled), target = student (no grad). Models are built on `device`, their weights in
    `memory_format`."""
    if mode == "full":
        student = make_full_student(teacher.unet, lcd.guidance_embed_dim).to(torch.float32, memory_format=memory_format)
        student.requires_grad_(True).train()
        # The target stays fp32: an EMA increment, (1 - decay) x one step's change, is far below the rounding step
        # of a half-precision weight, so a bf16/fp16 target would hardly ever move (tests/test_models.py).
        target = copy.deepcopy(student).requires_grad_(False)
        teacher_dtype = store_teacher(teacher.unet.to(memory_format=memory_format), teacher_storage or frozen_dtype,
                                      frozen_dtype)  # fmt: skip
        autocast = frozen_dtype if frozen_dtype != torch.float32 else None
        return LCDModels("full", student, target, teacher.unet, lcd.guidance_embed_dim, lcd.ema_decay,
                         teacher_dtype, autocast)  # fmt: skip
    unet = teacher.unet.to(device=device, dtype=frozen_dtype, memory_format=memory_format)
    plain = base_view(unet)
    try:
        unet.add_adapter(lora_config(lora))
    except ValueError as e:
        raise ConfigError(f"--lora-target-modules {lora.lora_target_modules}: {_first_line(e)}") from None
    for p in unet.parameters():  # adapters train in fp32 even when the base is half precision
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    return LCDModels("lora", unet, None, plain, lcd.guidance_embed_dim, lcd.ema_decay, frozen_dtype)


def store_teacher(unet: nn.Module, storage: torch.dtype, run_dtype: torch.dtype) -> torch.dtype:
    """Keep the frozen teacher's weights in `storage` and return the dtype it computes in: fp32 for an fp32
    teacher, else the run's. A teacher stored in less than that (bf16 under --mixed-precision no) is cast up one
    layer at a time during its forward (diffusers' layerwise casting; norms stay in full precision)."""
    compute = torch.float32 if storage == torch.float32 else run_dtype
    if storage == compute:
        unet.to(storage)
    else:
        unet.to(compute).enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    return compute


def base_view(unet: nn.Module) -> nn.Module:
    """A second UNet module over the SAME weight tensors (no copy): the frozen teacher of LCM-LoRA. Calling it
    equals the adapted UNet with its adapters disabled, without peft's per-layer wrapper (on small models that
    wrapper cost ~40% of a teacher forward). Build it on the final device: moving either module later unshares."""
    with torch.device("meta"):
        view = type(unet).from_config(unet.config)
    view.load_state_dict(unet.state_dict(), assign=True)
    return view.requires_grad_(False).eval()


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The adapter weights with peft's lora_A/lora_B names, which load_lora_weights maps onto every module.

    (diffusers' convert_state_dict_to_diffusers renames attention keys to the old `lora.down` style, and
    load_lora_weights then silently skips those: the attention adapters would be lost.)"""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(unet: nn.Module, family: str, out_dir: Path, lora: LoraConfig) -> Path:
    """pytorch_lora_weights.safetensors that `pipe.load_lora_weights(out_dir)` loads (alpha kept in metadata)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = lora_config(lora).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_class(family).save_lora_weights(
        str(out_dir), unet_lora_layers=state, unet_lora_adapter_metadata=metadata, safe_serialization=True
    )
    path = out_dir / "pytorch_lora_weights.safetensors"
    path.chmod(0o666 & ~current_umask())  # diffusers writes it through a private (0600) temporary file
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_full_lcm(student: nn.Module, teacher: Teacher, out_dir: Path, num_ddim_timesteps: int) -> None:
    """`unet/` plus `pipeline/`: a ready LCM pipeline folder (LatentConsistencyModelPipeline for SD,
    StableDiffusionXLPipeline with LCMScheduler for SDXL)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    student.save_pretrained(out_dir / "unet")
    scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=num_ddim_timesteps)
    if teacher.family == "sd":
        pipe = LatentConsistencyModelPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoders[0], tokenizer=teacher.tokenizers[0], unet=student,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        pipe = pipeline_class("sdxl")(
            vae=teacher.vae, text_encoder=teacher.text_encoders[0], text_encoder_2=teacher.text_encoders[1],
            tokenizer=teacher.tokenizers[0], tokenizer_2=teacher.tokenizers[1], unet=student, scheduler=scheduler,
            force_zeros_for_empty_prompt=teacher.extra.get("force_zeros_for_empty_prompt", True),
        )  # fmt: skip
    pipe.save_pretrained(out_dir / "pipeline", safe_serialization=True)
