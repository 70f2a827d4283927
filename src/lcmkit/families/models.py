"""The networks of one distillation, for any family: full LCD vs LCM-LoRA is decided here and nowhere else.

`build_lcd_models` returns student, teacher and target behind one call signature (the family's denoiser call), and
the loss never learns which mode it trains nor which family the teacher is."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lcmkit.errors import ConfigError
from lcmkit.errors import first_line as _first_line
from lcmkit.families.base import Family
from lcmkit.families.conditioning import Conditioning
from lcmkit.families.teacher import Teacher


@dataclass
class LoraConfig:
    """The [lora] options."""

    lora_rank: int = 64
    """Rank of the LCM-LoRA adapters."""
    lora_alpha: float | None = None
    """Defaults to lora_rank (scale 1)."""
    lora_target_modules: list[str] | None = None
    """Module names that get adapters; default: the family's (UNets: attention, feed-forward, resnet convs, time
    embedding; flow transformers: attention and feed-forward of every block)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    init_lora: str | None = None
    """Start from this LoRA (a file, a folder or a hub id; diffusers or kohya keys) instead of zero, e.g. a published
    LCM-LoRA to adapt to a fine-tune: its rank, alpha and targets replace --lora-rank/-alpha/-target-modules."""


@dataclass
class StudentSettings:
    """How the student and its target are built (options of the [lcd] section)."""

    ema_decay: float = 0.95
    """Decay of the full mode's EMA target (LoRA mode has no separate target)."""
    guidance_embed_dim: int = 256
    """Width of the w embedding that enters a full student through timestep_cond."""


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
    """Student, teacher and target behind one signature (the family's denoiser call); plus what trains and what to
    checkpoint."""

    family: Family
    mode: str
    student_net: nn.Module
    target_net: nn.Module | None  # full: the EMA copy; LoRA: None (the target is the student)
    teacher_net: nn.Module
    ema_decay: float
    teacher_dtype: torch.dtype = torch.float32
    """What the teacher computes in (its weights may be stored in less: see store_teacher)."""
    target_autocast: torch.dtype | None = None
    """Full mode under mixed precision: the fp32 target computes in this dtype."""

    def student_forward(self, net: nn.Module | None = None):
        """The student callable; `net` may be the accelerate-wrapped module (DDP)."""
        net, call = net or self.student_net, self.family.call
        return lambda z, t, c, w: call(net, z, t, c, w, None)

    def teacher(self, z_t: Tensor, t: Tensor, cond: Conditioning, w: Tensor) -> Tensor:
        return self.family.call(self.teacher_net, z_t, t, cond, w, self.teacher_dtype)

    def target(self, z_t: Tensor, t: Tensor, cond: Conditioning, w: Tensor) -> Tensor:
        if self.mode != "full":
            return self.family.call(self.student_net, z_t, t, cond, w, None)
        dtype = self.target_autocast
        with torch.autocast(z_t.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.family.call(self.target_net, z_t, t, cond, w, None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student_net.parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self) -> None:
        """theta- <- decay theta- + (1 - decay) theta (full LCD only)."""
        if self.target_net is None:
            return
        torch._foreach_lerp_(list(self.target_net.parameters()), list(self.student_net.parameters()),
                             1.0 - self.ema_decay)  # fmt: skip

    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"student": TrainableState(self.student_net)}
        if self.target_net is not None:
            state["target"] = self.target_net
        return state


def teacher_features(models: LCDModels) -> Any:
    """(z_t, t, cond) -> the frozen teacher's feature maps at its family's feature modules (forward hooks around one
    teacher call). Gradients flow to z_t (the adversarial generator term), never into the teacher's weights."""
    net, family = models.teacher_net, models.family
    modules = dict(net.named_modules())
    names = family.feature_modules(net) if family.feature_modules else []

    def run(z_t: Tensor, t: Tensor, cond: Conditioning) -> list[Tensor]:
        outputs: list[Tensor] = []

        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if family.feature_map is not None:
                outputs.append(family.feature_map(out, z_t))
            else:
                outputs.append(out[0] if isinstance(out, tuple) else out)

        hooks = [modules[name].register_forward_hook(keep) for name in names]
        try:
            family.call(net, z_t, t, cond, None, models.teacher_dtype)
        finally:
            for hook in hooks:
                hook.remove()
        return outputs

    return run


def lora_config(cfg: LoraConfig, family: Family) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.lora_target_modules if cfg.lora_target_modules is not None else family.lora_targets
    return PeftLoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
        target_modules=list(targets),
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian",
    )


def build_lcd_models(
    teacher: Teacher, mode: str, lcd: StudentSettings, lora: LoraConfig, frozen_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", teacher_storage: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> LCDModels:  # fmt: skip
    """Full: student = the family's full student of the teacher (fp32, trains), target = EMA of it (fp32, computed
    in frozen_dtype), teacher frozen (stored in teacher_storage, default frozen_dtype: see store_teacher).
    LoRA: one set of denoiser weights: student = teacher + adapters, teacher = a plain view of the base weights
    (= adapters disabled), target = student (no grad). Models are built on `device`, their weights in
    `memory_format`."""
    family, net = teacher.family, teacher.denoiser
    if mode == "full":
        student = family.full_student(net, lcd.guidance_embed_dim).to(torch.float32, memory_format=memory_format)
        student.requires_grad_(True).train()
        # The target stays fp32: an EMA increment, (1 - decay) x one step's change, is far below the rounding step
        # of a half-precision weight, so a bf16/fp16 target would hardly ever move (tests/test_perf.py).
        target = copy.deepcopy(student).requires_grad_(False)
        teacher_dtype = store_teacher(net.to(memory_format=memory_format), teacher_storage or frozen_dtype,
                                      frozen_dtype)  # fmt: skip
        autocast = frozen_dtype if frozen_dtype != torch.float32 else None
        return LCDModels(family, "full", student, target, net, lcd.ema_decay, teacher_dtype, autocast)
    net = net.to(device=device, dtype=frozen_dtype, memory_format=memory_format)
    plain = base_view(net)
    if lora.init_lora:
        load_init_lora(net, family, lora)
    else:
        try:
            net.add_adapter(lora_config(lora, family))
        except ValueError as e:
            raise ConfigError(f"--lora-target-modules {lora.lora_target_modules}: {_first_line(e)}") from None
    for p in net.parameters():  # adapters train in fp32 even when the base is half precision
        if p.requires_grad:
            p.data = p.data.float()
    net.train()
    return LCDModels(family, "lora", net, None, plain, lcd.ema_decay, frozen_dtype)


def load_init_lora(net: nn.Module, family: Family, lora: LoraConfig) -> None:
    """--init-lora: the adapter a LoRA file describes, loaded through diffusers (which reads diffusers, peft and
    kohya keys) as the trainable adapter; `lora` is updated to its rank, alpha and targets (what the output records).
    A LoRA that does not fit this denoiser gets one line."""
    from lcmkit.safe_load import lora_file

    spec = str(lora.init_lora)
    source = str(lora_file(spec)) if Path(spec).expanduser().exists() else spec
    try:
        read = family.pipeline_class().lora_state_dict(source, return_lora_metadata=True)
        # (state, network alphas, metadata) from the UNet families' loader, (state, metadata) from SD3's and FLUX's
        state, alphas, metadata = read if len(read) == 3 else (read[0], None, read[-1])
    except Exception as e:
        raise ConfigError(f"--init-lora {spec}: could not read it ({_first_line(e)})") from None
    prefix = f"{family.denoiser}."
    state = {k: v for k, v in state.items() if k.startswith(prefix)}
    downs = ("lora_A.weight", ".lora.down.weight", "_lora.down.weight", ".lora_down.weight")  # peft, old, kohya-read
    modules = [k for k in state if k.endswith(downs)]
    if not modules:
        raise ConfigError(f"--init-lora {spec} holds no {family.denoiser} LoRA weights")
    try:
        net.load_lora_adapter(state, prefix=family.denoiser, network_alphas=alphas, metadata=metadata,
                              adapter_name="default")  # fmt: skip
    except Exception as e:
        raise ConfigError(f"--init-lora {spec} does not fit this {family.label} {family.denoiser}: "
                          f"{_first_line(e)}") from None  # fmt: skip
    loaded = {n.split(".lora_A")[0] for n, _ in net.named_parameters() if ".lora_A" in n}
    if len(loaded) < len(modules):
        raise ConfigError(f"--init-lora {spec}: only {len(loaded)} of its {len(modules)} modules are in this "
                          f"{family.label} {family.denoiser}: it was made for another model")  # fmt: skip
    for name, p in net.named_parameters():
        p.requires_grad_(".lora_" in name)
    config = net.peft_config["default"]
    lora.lora_rank, lora.lora_alpha = int(config.r), float(config.lora_alpha)
    lora.lora_target_modules = sorted(config.target_modules)


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


def save_lora(
    unet: nn.Module, family: Family, out_dir: Path, lora: LoraConfig, extra: dict[str, str] | None = None
) -> Path:
    """pytorch_lora_weights.safetensors that `pipe.load_lora_weights(out_dir)` loads (alpha kept in metadata);
    `extra` metadata (strings) is added to the file's header."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = lora_config(lora, family).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    family.pipeline_class().save_lora_weights(
        str(out_dir), safe_serialization=True,
        **{f"{family.denoiser}_lora_layers": state, f"{family.denoiser}_lora_adapter_metadata": metadata},
    )  # fmt: skip
    path = out_dir / "pytorch_lora_weights.safetensors"
    if extra:
        add_metadata(path, extra)
    path.chmod(0o666 & ~current_umask())  # diffusers writes it through a private (0600) temporary file
    return path


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with `extra` added to its header metadata (atomically: a temporary file, renamed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = {**(f.metadata() or {}), **extra}
    tmp = path.with_name(path.name + ".tmp")
    save_file(load_file(path), tmp, metadata=metadata)
    tmp.replace(path)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_full_lcm(student: nn.Module, teacher: Teacher, out_dir: Path, num_ddim_timesteps: int) -> None:
    """`unet/` (`transformer/`) plus `pipeline/`: a ready LCM pipeline folder (the family's LCM pipeline class: for SD
    LatentConsistencyModelPipeline, for SDXL StableDiffusionXLPipeline, for SD3/FLUX their own) with LCMScheduler
    on the trained grid, or FlowMatchLCMScheduler with the teacher's shift for a flow model."""
    from diffusers import FlowMatchLCMScheduler, LCMScheduler

    family = teacher.family
    student.save_pretrained(out_dir / family.denoiser)
    if family.flow:
        scheduler = FlowMatchLCMScheduler.from_config(teacher.scheduler.config)
    else:
        scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=num_ddim_timesteps)
    pipe = family.lcm_pipeline_class()(
        vae=teacher.vae, scheduler=scheduler, **{family.denoiser: student},
        **family.components(teacher.text_encoders, teacher.tokenizers), **family.pipeline_kwargs, **teacher.extra,
    )  # fmt: skip
    pipe.save_pretrained(out_dir / "pipeline", safe_serialization=True)
