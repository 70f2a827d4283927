"""Full-size public architectures with random weights, for benchmarks that must run without a model hub.

Speed and memory depend on the architecture, not on the weights: `build_sd15` writes a diffusers folder with
Stable Diffusion 1.5's published configs (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M, the full CLIP
vocabulary) and random weights; `synthetic_images` writes a small captioned image folder to train on.
"""

from __future__ import annotations

import random
from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)  # fmt: skip
ARCHS = ("sd15",)


def build_sd15(out: str | Path, seed: int = 0) -> Path:
    """A Stable Diffusion 1.5 folder (fp32 safetensors, about 4.3 GB) with random weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lcmkit.families.tokenizers import build_clip_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=build_clip_tokenizer(num_merges=SD15_TEXT["vocab_size"] - 514),  # the full CLIP vocabulary
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def synthetic_images(out: str | Path, n: int = 16, size: int = 256, seed: int = 0) -> str:
    """n captioned images (a coloured rectangle on a plain background) as an image folder; returns its spec."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "white": (250, 250, 250)}
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fg, bg = rng.sample(sorted(colours), 2)
        image = Image.new("RGB", (size, size), colours[bg])
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        ImageDraw.Draw(image).rectangle((x0, y0, x0 + size // 3, y0 + size // 4), fill=colours[fg])
        image.save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(f"a {fg} rectangle on a {bg} background")
    return f"folder:{out}"
