"""lcmkit: Latent Consistency Distillation for Stable Diffusion and SDXL."""

__version__ = "0.1.0"
