"""Tiny but real-architecture teachers (SD 1.5 / SD 2.1-v / SDXL layout) and tiny WebDataset shards.

Every module is a real diffusers / transformers class with the real wiring (4-block VAE with
vae_scale_factor 8, cross-attention UNet, CLIP text encoders, the SD schedulers), only narrow and
shallow, so that a whole pipeline folder is a few MB and a forward pass takes milliseconds on CPU.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

TEXT_HIDDEN = 32  # hidden size of every tiny CLIP text encoder
TEXT_PROJECTION = 32  # projection_dim of the SDXL text_encoder_2
TIME_EMBED_DIM = 8  # SDXL addition_time_embed_dim (6 micro-conditioning numbers)
RESOLUTION = 64  # pixels; latents are RESOLUTION // 8 = 8
SD_SCALING = 0.18215
SDXL_SCALING = 0.13025

_SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _tokenizer():
    from lcmkit.toy.tokenizer import load_toy_tokenizer

    return load_toy_tokenizer()


def _text_config(tokenizer, projection_dim: int = TEXT_PROJECTION, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_vae(scaling_factor: float = SD_SCALING, force_upcast: bool = False):
    """AutoencoderKL with 4 blocks (vae_scale_factor 8, like SD), 4 latent channels, ~60k parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _unet_kwargs() -> dict:
    return dict(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """Write a StableDiffusionPipeline folder (safetensors) and return its path.

    epsilon: SD 1.5 layout (PNDM scheduler); v_prediction: SD 2.1 layout (DDIM scheduler, linear
    projections in the transformer blocks). Both with the SD scaled_linear betas.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    path = Path(path)
    tokenizer = _tokenizer()
    v = prediction_type == "v_prediction"

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_kwargs(), cross_attention_dim=TEXT_HIDDEN, use_linear_projection=v)
    vae = tiny_vae(SD_SCALING)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu" if v else "quick_gelu"))
    sched_cls = DDIMScheduler if v else PNDMScheduler
    extra = {"clip_sample": False} if v else {"skip_prk_steps": True}
    scheduler = sched_cls(
        **_SD_BETAS,
        prediction_type=prediction_type,
        set_alpha_to_one=False,
        steps_offset=1,
        **extra,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_sdxl(path: str | Path) -> Path:
    """Write a StableDiffusionXLPipeline folder (two CLIP encoders, text_time conditioning, Euler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **_unet_kwargs(),
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN,
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
    )
    vae = tiny_vae(SDXL_SCALING, force_upcast=True)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS,
        prediction_type="epsilon",
        steps_offset=1,
        interpolation_type="linear",
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


T5_DIM = 64  # d_model of the tiny T5 (SD3: >= the two CLIPs' hidden states side by side)
T5_WORDS = ["a", "an", "on", "of", "the", "photo", "square", "rectangle", "background", "red", "green", "blue",
            "yellow", "white", "black", "cat", "dog"]  # fmt: skip


def _t5(seed: int = 2):
    """A tiny T5 encoder and its offline T5Tokenizer (SentencePiece unigram)."""
    from transformers import T5Config, T5EncoderModel

    from lcmkit.families.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(T5_WORDS)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)  # fmt: skip
    return T5EncoderModel(config), tokenizer


def tiny_vae16(scaling_factor: float, shift_factor: float):
    """The 16-channel AutoencoderKL of SD3 / FLUX (no quant convs, a shift factor), 4 blocks, tiny."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def make_tiny_sd3(path: str | Path) -> Path:
    """Write a StableDiffusion3Pipeline folder: MMDiT (SD3Transformer2DModel), CLIP-L + CLIP-G (with projection) +
    T5, the 16-channel VAE, FlowMatchEulerDiscreteScheduler with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
    text_encoder_3, tokenizer_3 = _t5()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_PROJECTION, out_channels=16, pos_embed_max_size=16,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae16(1.5305, 0.0609), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_flux(path: str | Path, schnell: bool = False) -> Path:
    """Write a FluxPipeline folder: FluxTransformer2DModel (FLUX.1-dev: a guidance embedding; schnell: none, no
    shift), CLIP-L + T5, the 16-channel VAE, FlowMatchEulerDiscreteScheduler (dev: dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2, tokenizer_2 = _t5()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=not schnell, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    if schnell:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    else:
        dynamic = dict(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **dynamic)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae16(0.3611, 0.1159), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)
    return path


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def _sample_image(rng: random.Random, size: int):
    """A coloured rectangle on a plain background, with a caption that describes it."""
    from PIL import Image, ImageDraw

    w = size + rng.choice((0, 0, 8, 24))
    h = size + rng.choice((0, 0, 8, 16))
    fg, bg = rng.sample(sorted(COLOURS), 2)
    img = Image.new("RGB", (w, h), COLOURS[bg])
    x0, y0 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
    x1, y1 = rng.randrange(x0 + 16, w + 1), rng.randrange(y0 + 16, h + 1)
    ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[fg])
    shape = "square" if abs((x1 - x0) - (y1 - y0)) < 8 else "rectangle"
    return img, f"a {fg} {shape} on a {bg} background"


def make_shards(
    dir: str | Path,
    n_shards: int = 2,
    per_shard: int = 8,
    size: int = 72,
    seed: int = 0,
    caption_key: str = "txt",
    image_key: str = "jpg",
) -> str:
    """Write dir/00000.tar ... and return the brace spec f"{dir}/{{00000..NNNNN}}.tar".

    Each sample: an image under `image_key` ("jpg" or "png"), sizes size..size+24 wide and
    size..size+16 high (shorter side >= size), a caption and a "json" with original_width/height.
    caption_key "txt" or "caption" puts the caption under that key (and not in the json);
    "json" puts it only in the json's "caption" field.
    """
    import webdataset as wds

    if caption_key not in ("txt", "caption", "json"):
        raise ValueError(f"caption_key must be 'txt', 'caption' or 'json', got {caption_key!r}")
    if image_key not in ("jpg", "png"):
        raise ValueError(f"image_key must be 'jpg' or 'png', got {image_key!r}")
    if n_shards < 1 or per_shard < 1:
        raise ValueError("n_shards and per_shard must be >= 1")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                img, caption = _sample_image(rng, size)
                buf = io.BytesIO()
                if image_key == "jpg":
                    img.save(buf, format="JPEG", quality=95)
                else:
                    img.save(buf, format="PNG")
                meta = {"original_width": img.width, "original_height": img.height}
                sample = {"__key__": f"{s:05d}_{i:05d}", image_key: buf.getvalue()}
                if caption_key == "json":
                    meta["caption"] = caption
                else:
                    sample[caption_key] = caption.encode("utf-8")
                sample["json"] = json.dumps(meta).encode("utf-8")
                sink.write(sample)
    return f"{out}/{{00000..{n_shards - 1:05d}}}.tar"


def make_tiny_lora(teacher: str | Path, out: str | Path, rank: int = 4) -> Path:
    """An LCM-LoRA-shaped adapter for a tiny teacher folder, built (not trained) in a blink: lcmkit's own
    LoRA config and writer, with small random B weights so that the adapter changes the UNet."""
    from diffusers import UNet2DConditionModel

    from lcmkit.families import get_family
    from lcmkit.families.models import LoraConfig, lora_config, save_lora

    unet = UNet2DConditionModel.from_pretrained(Path(teacher) / "unet")
    cfg = LoraConfig(lora_rank=rank)
    unet.add_adapter(lora_config(cfg, get_family("sd")))
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, 0.02)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return save_lora(unet, get_family("sd"), out, cfg)


def make_tiny_full_lcm(teacher: str | Path, out: str | Path) -> Path:
    """A full-LCM output folder (unet/ + pipeline/) for a tiny teacher: the untrained, zero-initialised student
    written by lcmkit's own writer."""
    from lcmkit.families.models import save_full_lcm
    from lcmkit.families.teacher import ModelConfig, load_teacher
    from lcmkit.families.unet import make_full_student

    loaded = load_teacher(ModelConfig(teacher=str(teacher)))
    out = Path(out)
    save_full_lcm(make_full_student(loaded.denoiser, 256), loaded, out, 50)
    return out
