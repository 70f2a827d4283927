"""What lcmkit knows of a model family, as one object per family (families/sd.py, sdxl.py, sd3.py, flux.py).

Nothing outside families/ compares family names: code elsewhere asks the family object for its pipeline classes,
component names, conditioning and file layouts. A new family is one module here and one line in
families/__init__.py (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

TextEncode = Callable[[list[Tensor], list[nn.Module]], tuple[Tensor, Tensor | None]]
"""(token ids per tokenizer, text encoders) -> (hidden states the denoiser attends to, pooled embedding or None)."""

DenoiserCall = Callable[[nn.Module, Tensor, Tensor, Any, Tensor | None, torch.dtype | None], Tensor]
"""(network, z_t, t, conditioning, w or None, compute dtype or None: the weights') -> raw output. t is the trajectory's
time (a DDPM timestep, or a flow sigma); w reaches the network only if it has a guidance input (a full LCM's
w embedding, FLUX.1-dev's guidance embedding)."""

FullStudent = Callable[[nn.Module, int], nn.Module]
"""(the teacher's denoiser, guidance embedding width) -> a full student that starts as the teacher."""


@dataclass(frozen=True)
class Family:
    name: str
    """Its name in configs, run records and caches: sd, sdxl."""
    label: str
    """For people: Stable Diffusion, SDXL."""
    hub_tag: str
    """The model-card tag of its models."""
    pipeline: str
    """The diffusers pipeline class of a teacher (and of a base with an LCM-LoRA)."""
    lcm_pipeline: str
    """The diffusers pipeline class a full LCM's pipeline/ folder is saved as."""
    text_encoders: tuple[str, ...]
    """Pipeline component names of its text encoders, in order; tokenizers are named alike (tokenizer, ...)."""
    encode_text: TextEncode
    """Its text conditioning (see TextEncode)."""
    call: DenoiserCall
    """How its denoiser is called (see DenoiserCall)."""
    full_student: FullStudent
    """How a full student is made from the teacher's denoiser."""
    lora_targets: tuple[str, ...]
    """Module names that get LoRA adapters by default."""
    guidance_range: tuple[float, float]
    """The default range of w (guidance scale w + 1) a student learns."""
    denoiser: str = "unet"
    """The pipeline component name of its denoiser: unet or transformer."""
    flow: bool = False
    """A rectified-flow teacher (velocity, sigma in [0, 1]) rather than a VP diffusion."""
    guidance_distilled: bool = False
    """The teacher takes the guidance scale as an input (FLUX.1-dev): no unconditional pass."""
    full_student_takes_w: bool = True
    """A full student has a guidance input, so it learns the whole w range (else: one w, baked in)."""
    text_lengths: tuple[int | None, ...] = ()
    """Token length per tokenizer (None or missing: the tokenizer's model_max_length)."""
    check_teacher: Callable[[Mapping[str, Any], str], None] | None = None
    """Refuses a teacher this family cannot distill from its denoiser's config (and its spec): raises ConfigError."""
    teacher_guidance: float = 7.5
    """The teacher's guidance_scale when none is given: its pipeline's usual one (Stable Diffusion: 7.5)."""
    pipeline_latents: Callable[[Tensor], Tensor] | None = None
    """(B, C, H, W) latents -> what its pipeline's `latents` argument takes (FLUX: packed tokens), if not those."""
    feature_modules: Callable[[nn.Module], list[str]] | None = None
    """The denoiser's modules whose outputs an adversarial discriminator reads (None: not supported yet)."""
    feature_map: Callable[[Any, Tensor], Tensor] | None = None
    """(one feature module's output, the noised latent z_t) -> a (B, C, H, W) map, if the output is not one (a
    transformer block's image tokens)."""
    text_encoder_labels: Mapping[str, str] = field(default_factory=dict)
    """What each text encoder is, for messages: text_encoder_2 -> T5."""
    time_ids: bool = False
    """Whether the UNet is micro-conditioned on sizes and crop (SDXL's add_time_ids)."""
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Fixed constructor arguments of its pipelines (e.g. no safety checker)."""
    zeros_uncond_flag: str | None = None
    """The pipeline config entry that makes its empty prompt an all-zeros embedding, if it has one."""
    single_file_markers: tuple[str, ...] = ()
    """Key prefixes only its single-file checkpoints hold (any one of them marks the family)."""
    single_file_text_prefixes: tuple[str, ...] = ()
    """Where its text encoders live in a single-file checkpoint (sgm layout); empty: the LDM cond_stage_model."""
    unet_marker: Mapping[str, Any] = field(default_factory=dict)
    """UNet config entries only its UNets have."""
    cross_attention: Mapping[int, str] = field(default_factory=dict)
    """UNet cross-attention width -> the version it tells apart (e.g. 768: 1.x)."""

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(name.replace("text_encoder", "tokenizer") for name in self.text_encoders)

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)

    def lcm_pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.lcm_pipeline)

    def components(self, text_encoders: list[nn.Module], tokenizers: list[Any]) -> dict[str, Any]:
        """The text encoders and tokenizers under their pipeline component names."""
        return {**dict(zip(self.text_encoders, text_encoders)), **dict(zip(self.tokenizers, tokenizers))}
