"""The tiny teachers and shards are real: diffusers' own pipelines load and run them, webdataset reads the shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from tiny_models import make_shards


def _run(pipe, **extra) -> np.ndarray:
    out = pipe(
        "a red square on a blue background", num_inference_steps=2, guidance_scale=2.0, height=64, width=64,
        generator=torch.Generator().manual_seed(0), output_type="np", **extra,
    )  # fmt: skip
    return out.images


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sd_v"])
def test_tiny_sd_runs_in_diffusers(request, which):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(request.getfixturevalue(which))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    expected = "v_prediction" if which == "tiny_sd_v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    images = _run(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_tiny_sdxl_runs_in_diffusers(tiny_sdxl):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.vae_scale_factor == 8
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.unet.config.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    images = _run(pipe, negative_prompt="")
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_teachers_are_deterministic(tiny_sd, tmp_path):
    from safetensors.torch import load_file
    from tiny_models import make_tiny_sd

    again = make_tiny_sd(tmp_path / "again")
    for sub, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        a = load_file(f"{tiny_sd}/{sub}/{name}.safetensors")
        b = load_file(f"{again}/{sub}/{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _read(spec: str) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(spec, shardshuffle=False, empty_check=False))


def test_shards_read_with_webdataset(shards):
    from PIL import Image

    samples = _read(shards)
    assert len(samples) == 16 and len({s["__key__"] for s in samples}) == 16
    sizes = set()
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        assert (meta["original_width"], meta["original_height"]) == img.size and min(img.size) >= 64
        assert s["txt"].decode().startswith("a ")
        sizes.add(img.size)
    assert len(sizes) > 1 and any(w != h for w, h in sizes)


@pytest.mark.parametrize("caption_key", ["caption", "json"])
def test_shard_caption_keys(tmp_path, caption_key):
    spec = make_shards(tmp_path, n_shards=1, per_shard=3, caption_key=caption_key, image_key="png")
    assert spec == f"{tmp_path}/{{00000..00000}}.tar"
    samples = _read(spec)
    assert len(samples) == 3 and all("png" in s and "txt" not in s for s in samples)
    for s in samples:
        meta = json.loads(s["json"])
        if caption_key == "json":
            assert "caption" not in s and meta["caption"].startswith("a ")
        else:
            assert "caption" not in meta and s["caption"].decode().startswith("a ")
