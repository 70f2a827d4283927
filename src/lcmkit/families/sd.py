"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state conditions the UNet."""

from __future__ import annotations

from torch import Tensor, nn

from lcmkit.families.base import Family
from lcmkit.families.unet import UNET_LORA_TARGETS, denoise, feature_modules, make_full_student


def encode_text(token_ids: list[Tensor], encoders: list[nn.Module]) -> tuple[Tensor, None]:
    """The last hidden state of the CLIP text encoder (after its final layer norm)."""
    (ids,), (encoder,) = token_ids, encoders
    return encoder(ids)[0], None


SD = Family(
    name="sd",
    label="Stable Diffusion",
    hub_tag="stable-diffusion",
    pipeline="StableDiffusionPipeline",
    lcm_pipeline="LatentConsistencyModelPipeline",
    text_encoders=("text_encoder",),
    encode_text=encode_text,
    call=denoise,
    full_student=make_full_student,
    feature_modules=feature_modules,
    lora_targets=UNET_LORA_TARGETS,
    guidance_range=(3.0, 15.0),
    pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    cross_attention={768: "1.x", 1024: "2.x"},
)
