"""Training batches -> what a method needs: clean latents and the conditional and unconditional conditioning, from
raw images (VAE and text encoders) or from an lcmkit cache (stored latent distributions and embeddings)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from lcmkit.families.conditioning import Conditioning, TextConditioner
from lcmkit.families.teacher import Teacher


class BatchEncoder:
    """(z0, cond, uncond) of a data batch. Rows whose caption was dropped train on the unconditional branch."""

    def __init__(
        self, teacher: Teacher, conditioner: TextConditioner, uncond: str, resolution: int,
        generator: torch.Generator, device: torch.device,
    ):  # fmt: skip
        self.vae, self.scaling, self.conditioner = teacher.vae, teacher.vae_scaling_factor, conditioner
        self.shift = teacher.vae_shift_factor
        self.uncond = teacher.default_uncond() if uncond == "auto" else uncond
        self.size, self.generator, self.device = (resolution, resolution), generator, device

    def scaled(self, latent: Tensor) -> Tensor:
        """The diffusion model's latent: (VAE latent - shift) * scaling (no shift for SD/SDXL's VAEs)."""
        return (latent if self.shift is None else latent - self.shift) * self.scaling

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> tuple[Tensor, Conditioning, Conditioning]:
        device, dtype, generator = self.device, self.vae.dtype, self.generator
        with record_function("train/encode"):
            if "latent_mean" in batch:  # from a cache: draw the latent exactly as latent_dist.sample() does
                mean, std = batch["latent_mean"].to(device, dtype), batch["latent_std"].to(device, dtype)
                eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
                z0 = self.scaled(mean + std * eps)
                cond = self.conditioner.from_cache(batch, self.size)
            else:
                pixels = batch["pixel_values"].to(device, dtype)
                z0 = self.scaled(self.vae.encode(pixels).latent_dist.sample(generator))
                cond = self.conditioner.encode(batch["caption"], batch["original_size"], batch["crop_top_left"],
                                               self.size)  # fmt: skip
            uncond = self.conditioner.unconditional(cond, self.uncond)
            if batch["drop_caption"].any():
                cond = cond.where(batch["drop_caption"], uncond)
        return z0, cond, uncond
