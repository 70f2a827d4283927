"""SDXL: two CLIP text encoders (penultimate hidden states concatenated, the pooled output of encoder 2) and
micro-conditioning on original size, crop and target size (add_time_ids)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lcmkit.families.base import Family
from lcmkit.families.unet import UNET_LORA_TARGETS, denoise, feature_modules, make_full_student


def encode_text(token_ids: list[Tensor], encoders: list[nn.Module]) -> tuple[Tensor, Tensor]:
    """Penultimate hidden states of both encoders, concatenated; the projected pooled output of encoder 2."""
    hidden, pooled = [], None
    for ids, encoder in zip(token_ids, encoders):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (encoder 2)
    return torch.cat(hidden, dim=-1), pooled


SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

SDXL = Family(
    name="sdxl",
    label="SDXL",
    hub_tag="stable-diffusion-xl",
    pipeline="StableDiffusionXLPipeline",
    lcm_pipeline="StableDiffusionXLPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),
    encode_text=encode_text,
    call=denoise,
    full_student=make_full_student,
    feature_modules=feature_modules,
    lora_targets=UNET_LORA_TARGETS,
    guidance_range=(3.0, 15.0),
    time_ids=True,
    zeros_uncond_flag="force_zeros_for_empty_prompt",
    single_file_markers=("conditioner.embedders.1.",),
    single_file_text_prefixes=SDXL_TEXT_PREFIXES,
    unet_marker={"addition_embed_type": "text_time"},
    cross_attention={2048: ""},
)
