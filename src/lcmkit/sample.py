"""Few-step generation with an LCM UNet or an LCM-LoRA, through diffusers' pipelines and LCMScheduler."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw

from .models import Teacher, pipeline_class


def lcm_pipeline(teacher: Teacher, unet: torch.nn.Module, num_ddim_timesteps: int = 50) -> Any:
    """A StableDiffusion(XL)Pipeline over the teacher's components with `unet` and LCMScheduler.

    A full LCM UNet (time_cond_proj_dim set) takes guidance_scale as its w input (no CFG pass);
    an LCM-LoRA UNet is run with guidance_scale 1 (no CFG either)."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=num_ddim_timesteps)
    parts: dict[str, Any] = dict(
        vae=teacher.vae, text_encoder=teacher.text_encoders[0], tokenizer=teacher.tokenizers[0],
        unet=unet, scheduler=scheduler,
    )  # fmt: skip
    if teacher.family == "sdxl":
        parts.update(text_encoder_2=teacher.text_encoders[1], tokenizer_2=teacher.tokenizers[1])
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(teacher.family)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int,
    size: int,
    batch_size: int = 16,
) -> list[Image.Image]:
    """One image per prompt; image i uses its own generator seeded seed + i, so an image does not depend
    on the batch it was made in."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
            height=size, width=size, output_type="pil",
        )  # fmt: skip
        images += out.images
    return images


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """A labelled grid: one row per prompt, one column per setting."""
    w, h = rows[0][0].size
    cell = max(w, 96)
    left, top = 8, 16
    grid = Image.new("RGB", (left + cell * len(col_labels), top + (cell + 12) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((left + j * cell + 2, 2), label, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (cell + 12)
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left + j * cell, y))
        draw.text((left, y + cell), label[: cell * len(col_labels) // 6], fill="black")
    return grid
