"""The toy flow teacher's training recipe: a tiny Stable Diffusion 3 (MMDiT + CLIP-L, CLIP-G and T5) on the toy world.

Rectified flow, as SD3 trains: z_sigma = (1 - sigma) z_0 + sigma eps, the transformer predicts the velocity
eps - z_0 at timestep 1000 sigma, sigma drawn logit-normal and shifted like the scheduler's grid. It trains with
lcmkit's own Trainer, unchanged; the toy VAE (4 latent channels) is reused, frozen, and the three text encoders stay
at their seeded initialisation (a trained CLIP collapsed left and right in the UNet teacher: toy/teacher.py), so
every caption's conditioning is computed once. The run checkpoints and resumes (`lcmkit toy train-flow-teacher
--out DIR`), so it can span sessions.

The result is a plain StableDiffusion3Pipeline folder (FlowMatchEulerDiscreteScheduler), so the exact code path
lcmkit uses for SD3 / SD3.5 serves it. Its tokenizers are short (CLIP 24, T5 16 positions): the pipeline is called
with max_sequence_length=16, which lcmkit reads from the T5 tokenizer.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lcmkit.runtime import dtype_kwarg
from lcmkit.toy.teacher import LatentBatches, ToyRunRecipe, encode_training_set, open_run, run_recipe
from lcmkit.toy.tokenizer import load_toy_tokenizer
from lcmkit.toy.world import COLOURS, SHAPES, TOY_GUIDANCE_SCALE, sample_scenes
from lcmkit.train.checkpoint import GeneratorState
from lcmkit.train.loop import Update
from lcmkit.train.session import accelerator_session

TOY_WORDS = ["a", "at", "the", "in", "on", "of", "center", "background", "top", "bottom", "left", "right",
             "small", "large", "white", "black", *SHAPES, *COLOURS]  # fmt: skip
"""The T5 tokenizer's whole words: every word of a toy caption (toy/world.py), one piece each."""
EULER_STEPS = 28
"""The sampler the flow teacher is judged by: SD3's default of 28 Euler steps."""


@dataclass
class FlowTeacherRecipe(ToyRunRecipe):
    learning_rate: float = 5e-4
    shift: float = 1.0
    """The scheduler's sigma shift (SD3 uses 3 at 1024 px; 64 latent tokens need none)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    """sigma = sigmoid(u), u ~ N(logit_mean, logit_std^2): SD3's logit-normal timestep density."""
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32
    """6 joint blocks of width 128 (4 x 32): 3.6M parameters."""
    text_hidden: int = 64
    """Width of each CLIP (L and G); side by side they fill T5's width, as 768 + 1280 pad to 4096 in SD3."""
    text_layers: int = 2
    t5_dim: int = 128
    clip_tokens: int = 24
    """Captions are at most ~18 CLIP tokens."""
    t5_tokens: int = 16
    """Captions are at most 12 words, one T5 piece each, plus </s>."""


def toy_t5_tokenizer(recipe: FlowTeacherRecipe) -> Any:
    from lcmkit.families.tokenizers import build_t5_tokenizer

    return build_t5_tokenizer(TOY_WORDS, model_max_length=recipe.t5_tokens)


def build_text_encoders(recipe: FlowTeacherRecipe, clip_tokenizer: Any, t5_tokenizer: Any) -> list[nn.Module]:
    """CLIP-L and CLIP-G (with projection; G with SD3's gelu) and a T5 encoder, at seeded random initialisation."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders: list[nn.Module] = []
    for seed, act in ((1, "quick_gelu"), (2, "gelu")):
        torch.manual_seed(recipe.seed * 1000 + seed)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
            num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=recipe.clip_tokens,
            projection_dim=recipe.text_hidden, hidden_act=act, bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id,
        )))  # fmt: skip
    torch.manual_seed(recipe.seed * 1000 + 3)
    encoders.append(T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=recipe.t5_dim, d_kv=32, d_ff=2 * recipe.t5_dim, num_layers=1,
        num_heads=recipe.t5_dim // 32, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )))  # fmt: skip
    return [e.eval().requires_grad_(False) for e in encoders]


def build_transformer(recipe: FlowTeacherRecipe) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=recipe.num_layers,
        attention_head_dim=recipe.head_dim, num_attention_heads=recipe.num_heads, joint_attention_dim=recipe.t5_dim,
        caption_projection_dim=recipe.num_heads * recipe.head_dim, pooled_projection_dim=2 * recipe.text_hidden,
        pos_embed_max_size=8, qk_norm="rms_norm",
    )  # fmt: skip


def sigmas_of(u: Tensor, shift: float) -> Tensor:
    """Logit-normal draws -> sigma, shifted as FlowMatchEulerDiscreteScheduler shifts its grid."""
    sigma = torch.sigmoid(u)
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_loss(net: Any, z0: Tensor, eps: Tensor, sigma: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
    """Rectified flow's velocity regression: || v_theta((1 - sigma) z0 + sigma eps, sigma) - (eps - z0) ||^2."""
    s = sigma.view(-1, 1, 1, 1)
    z_sigma = (1 - s) * z0 + s * eps
    v = net(hidden_states=z_sigma, timestep=1000 * sigma, encoder_hidden_states=hidden, pooled_projections=pooled,
            return_dict=False)[0]  # fmt: skip
    return F.mse_loss(v, eps - z0)


class CaptionCache:
    """The frozen encoders' (hidden states, pooled) of every training caption and of the empty prompt, computed
    once with lcmkit's SD3 conditioning (families/sd3.py: what StableDiffusion3Pipeline.encode_prompt gives)."""

    def __init__(self, captions: list[str], tokenizers: list[Any], encoders: list[nn.Module]):
        from lcmkit.families.sd3 import encode_text

        self.captions = sorted(set(captions)) + [""]
        self.index = {c: i for i, c in enumerate(self.captions)}
        with torch.no_grad():
            ids = [tok(self.captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids for tok in tokenizers]  # fmt: skip
            self.hidden, self.pooled = encode_text(ids, encoders)
        self.empty = len(self.captions) - 1

    def rows(self, captions: list[str]) -> Tensor:
        return torch.tensor([self.index[c] for c in captions])


def save_pipeline(out: Path, transformer: nn.Module, encoders: list[nn.Module], vae: nn.Module,
                  tokenizers: list[Any], shift: float, dtype: torch.dtype = torch.float16) -> None:  # fmt: skip
    """A StableDiffusion3Pipeline folder: transformer and VAE in `dtype`, text encoders fp32 (transformers loads a
    model in its stored dtype; diffusers upcasts to fp32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip_l, clip_g, t5 = encoders
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=clip_l, tokenizer=tokenizers[0], text_encoder_2=clip_g, tokenizer_2=tokenizers[1],
        text_encoder_3=t5, tokenizer_3=tokenizers[2],
    )  # fmt: skip
    for module in (transformer, vae):
        module.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    for module in (transformer, vae):
        module.to(torch.float32)


def toy_flow_vae(folder: str) -> nn.Module:
    """The toy VAE, with SD3's latent shift (0: its latents are centred by its scaling factor alone)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    return vae


@torch.no_grad()
def flow_prompt_accuracy(pipeline_dir: Path | Any, n: int, steps: int = EULER_STEPS,
                         guidance: float = TOY_GUIDANCE_SCALE, seed: int = 1) -> dict:  # fmt: skip
    """Teacher quality: its own Euler sampler at `steps` with guidance, scored by the pixel checker."""
    from diffusers import StableDiffusion3Pipeline

    from lcmkit.toy.checker import attribute_accuracy, prompt_accuracy

    pipe = pipeline_dir
    if not hasattr(pipe, "transformer"):
        pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, **dtype_kwarg(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.caption() for s in sample_scenes(n, 10_000 + seed)]
    images: list[np.ndarray] = []
    for start in range(0, n, 50):
        batch = prompts[start : start + 50]
        out = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   generator=torch.Generator().manual_seed(seed + start), output_type="np",
                   max_sequence_length=pipe.tokenizer_3.model_max_length).images  # fmt: skip
        images.extend(out)
    images = [(im * 255).round().astype(np.uint8) for im in images]
    return {"prompt_accuracy": prompt_accuracy(images, prompts), **attribute_accuracy(images, prompts)}


def train_flow_teacher(recipe: FlowTeacherRecipe, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    from diffusers.optimization import get_scheduler

    out = open_run(recipe, {"family": "sd3", **asdict(recipe)})
    vae = toy_flow_vae(recipe.vae)
    clip_tokenizer = load_toy_tokenizer()
    clip_tokenizer.model_max_length = recipe.clip_tokens
    tokenizers = [clip_tokenizer, clip_tokenizer, toy_t5_tokenizer(recipe)]
    encoders = build_text_encoders(recipe, clip_tokenizer, tokenizers[2])
    cache_file = out / "latents.safetensors"
    from safetensors.torch import load_file, save_file

    if cache_file.is_file():
        data = load_file(cache_file)
        mean, std = data["mean"], data["std"]
        captions = json.loads((out / "captions.json").read_text())
    else:
        mean, std, captions = encode_training_set(vae, recipe)
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, cache_file)
        (out / "captions.json").write_text(json.dumps(captions))
    text = CaptionCache(captions, tokenizers, encoders)
    rows = text.rows(captions)

    model = build_transformer(recipe)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=recipe.warmup_steps)
    with accelerator_session() as accelerator:
        model, optimizer = accelerator.prepare(model, optimizer)
        scaling = float(vae.config.scaling_factor)
        generator = torch.Generator().manual_seed(recipe.seed + 1)

        def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
            b = batch["mean"].shape[0]
            z0 = (batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=generator)) * scaling
            caption = batch["ids"].clone()
            caption[torch.rand(b, generator=generator) < recipe.cond_dropout] = text.empty  # for guidance
            u = recipe.logit_mean + recipe.logit_std * torch.randn(b, generator=generator)
            eps = torch.randn(z0.shape, generator=generator)
            loss = flow_loss(model, z0, eps, sigmas_of(u, recipe.shift), text.hidden[caption], text.pooled[caption])
            return loss, {}

        @torch.no_grad()
        def update_ema() -> None:
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - recipe.ema_decay)

        def evaluate(step: int) -> None:
            pipe_dir = out / "eval-pipeline"
            save_pipeline(pipe_dir, ema, encoders, vae, tokenizers, recipe.shift, dtype=torch.float32)
            result = {"step": step, "time": time.time(), **flow_prompt_accuracy(pipe_dir, recipe.eval_images)}
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            tqdm.write(f"step {step}: prompt accuracy {result['prompt_accuracy']:.3f}")

        update = Update("teacher", model, optimizer, lr_scheduler, loss_fn, max_grad_norm=1.0)
        return run_recipe(
            accelerator, recipe, update, LatentBatches(mean, std, rows, recipe.batch_size, recipe.seed),
            {"model": model, "ema": ema, "noise": GeneratorState(generator)}, update_ema, evaluate,
            lambda: save_pipeline(out / "teacher", ema, encoders, vae, tokenizers, recipe.shift), "toy flow teacher",
            resume, progress,
        )  # fmt: skip
