"""The UNet families' denoiser (SD 1.x/2.x, SDXL): its call, its full student (a w input through timestep_cond) and
the modules its LoRA adapts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lcmkit.core.consistency import guidance_scale_embedding
from lcmkit.families.conditioning import Conditioning

UNET_LORA_TARGETS = (
    # attention, feed-forward, resnet convs and time embedding projection (LCM-LoRA paper setup)
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip


def config_of(module: nn.Module) -> Any:
    """The diffusers config of a model (a mapping), also through a DDP / compile wrapper."""
    return getattr(module, "module", module).config


def unet_call(
    unet: nn.Module, z_t: Tensor, t: Tensor, cond: Conditioning, timestep_cond: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """The UNet's output for inputs cast to `dtype` (default: its weights' dtype)."""
    dtype = dtype or next(unet.parameters()).dtype
    if timestep_cond is not None:
        timestep_cond = timestep_cond.to(dtype)
    return unet(z_t.to(dtype), t, timestep_cond=timestep_cond, **cond.to(dtype=dtype).unet_kwargs()).sample


def denoise(
    unet: nn.Module, z_t: Tensor, t: Tensor, cond: Conditioning, w: Tensor | None, dtype: torch.dtype | None = None
) -> Tensor:
    """A UNet with a w input (time_cond_proj_dim: a full LCM) gets w's sinusoidal embedding; others ignore w."""
    dim = config_of(unet).get("time_cond_proj_dim")
    timestep_cond = guidance_scale_embedding(w, dim) if dim and w is not None else None
    return unet_call(unet, z_t, t, cond, timestep_cond, dtype)


def feature_modules(unet: nn.Module) -> list[str]:
    """Every down block's and the mid block's output: the teacher features of an adversarial discriminator."""
    return [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]


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
