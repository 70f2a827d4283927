"""Stable Diffusion 3 / 3.5: an MMDiT (SD3Transformer2DModel) over 16-channel latents, rectified flow with a fixed
shift, conditioned on CLIP-L + CLIP-G (penultimate hidden states, side by side, zero-padded to T5's width) followed by
T5's tokens, and on both CLIPs' pooled projections. Classifier-free guidance: cond and uncond in one batched call."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lcmkit.families.base import Family
from lcmkit.families.conditioning import Conditioning
from lcmkit.families.transformer import (
    JOINT_ATTENTION_TARGETS,
    copy_student,
    feature_modules,
    pooled,
    token_map,
    weights_dtype,
)


def encode_text(token_ids: list[Tensor], encoders: list[nn.Module]) -> tuple[Tensor, Tensor]:
    """As StableDiffusion3Pipeline.encode_prompt (clip_skip None): [CLIP-L | CLIP-G | 0 pad] tokens, then T5 tokens;
    pooled = [CLIP-L pooled | CLIP-G pooled]."""
    (ids_l, ids_g, ids_t5), (clip_l, clip_g, t5) = token_ids, encoders
    hidden, pools = [], []
    for ids, encoder in ((ids_l, clip_l), (ids_g, clip_g)):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pools.append(out[0])  # text_embeds of CLIPTextModelWithProjection
    t5_hidden = t5(ids_t5)[0]
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2), torch.cat(pools, dim=-1)


def denoise(
    transformer: nn.Module, z_t: Tensor, sigma: Tensor, cond: Conditioning, w: Tensor | None,
    dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """The velocity at (z_t, sigma): the transformer takes timestep = 1000 sigma, as the pipeline passes it. SD3 has
    no guidance input: w is not used."""
    dtype = weights_dtype(transformer, dtype)
    return transformer(
        hidden_states=z_t.to(dtype), timestep=sigma.float() * 1000, encoder_hidden_states=cond.hidden_states.to(dtype),
        pooled_projections=pooled(cond, "SD3").to(dtype), return_dict=False,
    )[0]  # fmt: skip


SD3 = Family(
    name="sd3",
    label="SD3",
    hub_tag="stable-diffusion-3",
    pipeline="StableDiffusion3Pipeline",
    lcm_pipeline="StableDiffusion3Pipeline",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    encode_text=encode_text,
    call=denoise,
    full_student=copy_student,
    lora_targets=JOINT_ATTENTION_TARGETS,
    feature_modules=feature_modules,
    feature_map=token_map,
    guidance_range=(2.5, 6.0),
    teacher_guidance=7.0,
    denoiser="transformer",
    flow=True,
    full_student_takes_w=False,
    text_lengths=(None, None, 256),
    # the original layout (Stability's files, with or without the model prefix); diffusers' own layout
    single_file_markers=("model.diffusion_model.joint_blocks.", "joint_blocks.", "pos_embed.proj."),
    text_encoder_labels={"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5"},
)
