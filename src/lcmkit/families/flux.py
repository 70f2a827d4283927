"""FLUX.1: a rectified-flow transformer (FluxTransformer2DModel) over 16-channel latents packed into 2x2 patches
(64 features per token, rotary position ids), with a resolution-dependent shift; conditioned on T5's tokens and
CLIP-L's pooled output. FLUX.1-dev is guidance-distilled: the guidance scale is an input (one pass, no uncond).
FLUX.1-schnell is already a few-step model (no guidance input) and is refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lcmkit.core.solver import guidance_scale
from lcmkit.errors import ConfigError
from lcmkit.families.base import Family
from lcmkit.families.conditioning import Conditioning
from lcmkit.families.transformer import JOINT_ATTENTION_TARGETS, copy_student, pooled, weights_dtype


def encode_text(token_ids: list[Tensor], encoders: list[nn.Module]) -> tuple[Tensor, Tensor]:
    """As FluxPipeline.encode_prompt: T5's last hidden state; CLIP-L's pooled output."""
    (ids_clip, ids_t5), (clip, t5) = token_ids, encoders
    clip_pooled = clip(ids_clip, output_hidden_states=False).pooler_output
    return t5(ids_t5, output_hidden_states=False)[0], clip_pooled


def pack(z: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches (FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of `pack`."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids (0, row, column) of the packed tokens of an h x w latent."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def denoise(
    transformer: nn.Module, z_t: Tensor, sigma: Tensor, cond: Conditioning, w: Tensor | None,
    dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """The velocity at (z_t, sigma), unpacked to (B, C, H, W). A transformer with a guidance embedding (FLUX.1-dev and
    its students) gets diffusers' guidance scale w + 1, as FluxPipeline passes guidance_scale."""
    dtype = weights_dtype(transformer, dtype)
    config = getattr(transformer, "module", transformer).config
    h, w_ = z_t.shape[-2:]
    text = cond.hidden_states.to(dtype)
    guidance = guidance_scale(w.float()) if config.guidance_embeds and w is not None else None
    out = transformer(
        hidden_states=pack(z_t).to(dtype), timestep=sigma.float(), guidance=guidance,
        pooled_projections=pooled(cond, "FLUX").to(dtype), encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=dtype),
        img_ids=image_ids(h, w_, z_t.device, dtype), return_dict=False,
    )[0]  # fmt: skip
    return unpack(out, h, w_)


def check_teacher(config: Mapping[str, Any], spec: str) -> None:
    """FLUX.1-schnell (no guidance embedding in its transformer config) is timestep-distilled already: it samples in
    1-4 steps as it is."""
    if not config.get("guidance_embeds"):
        raise ConfigError(f"teacher {spec} is a FLUX.1-schnell-type model (no guidance input): it already samples "
                          "in 1-4 steps, so there is nothing to distill; distill FLUX.1-dev (or a fine-tune of it)")


FLUX = Family(
    name="flux",
    label="FLUX.1",
    hub_tag="flux",
    pipeline="FluxPipeline",
    lcm_pipeline="FluxPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),
    encode_text=encode_text,
    call=denoise,
    full_student=copy_student,
    lora_targets=(*JOINT_ATTENTION_TARGETS, "proj_mlp", "proj_out"),
    guidance_range=(1.5, 4.0),
    teacher_guidance=3.5,
    pipeline_latents=pack,
    denoiser="transformer",
    flow=True,
    guidance_distilled=True,
    text_lengths=(None, 512),
    # the original layout (Black Forest Labs' files, with or without the model prefix); diffusers' own layout
    single_file_markers=("double_blocks.", "model.diffusion_model.double_blocks.", "x_embedder."),
    check_teacher=check_teacher,
    text_encoder_labels={"text_encoder": "CLIP-L", "text_encoder_2": "T5"},
)
