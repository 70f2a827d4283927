"""The toy teacher's training recipe: a tiny Stable Diffusion (UNet + CLIP text encoder) on the toy world.

It trains with lcmkit's own Trainer, unchanged (the trainer knows nothing of LCD or of denoising: it
minimises the loss it is given). The VAE is trained first (toy/vae.py) and frozen here; latents of a
fixed rendered training set are computed once. The run checkpoints every few minutes and resumes
with `--resume` (the default), so it can span sessions: `lcmkit toy train-teacher --out DIR`.

The result is a plain StableDiffusionPipeline folder (epsilon prediction, SD's scaled-linear noise
schedule, the real CLIPTokenizer class with a small BPE vocabulary), so the exact code path used for
Stable Diffusion serves it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lcmkit.measure.system import cpu_model
from lcmkit.runtime import dtype_kwarg
from lcmkit.toy.tokenizer import load_toy_tokenizer
from lcmkit.toy.world import TOY_GUIDANCE_SCALE, render_array, sample_scenes, sample_seed
from lcmkit.train.checkpoint import GeneratorState
from lcmkit.train.loop import LoopSettings, Trainer, Update
from lcmkit.train.session import accelerator_session

SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon",
)  # fmt: skip


@dataclass
class ToyRunRecipe:
    """What both toy teachers' runs share (the UNet's TeacherRecipe, toy/flow_teacher.py's FlowTeacherRecipe)."""

    out: str
    vae: str
    """Folder of the trained toy VAE (save_pretrained)."""
    steps: int = 15000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    """Captions dropped to the empty prompt, for classifier-free guidance."""
    num_train_images: int = 20000
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 1000
    eval_images: int = 200
    num_threads: int = 0


@dataclass
class TeacherRecipe(ToyRunRecipe):
    offset_noise: float = 0.1
    """Std of a per-channel constant added to the noise. The toy's 16x16 latents carry their background in the
    mean, and at t=999 that mean survives the SD schedule about as strongly as plain noise's mean: trained without
    this, the teacher read the background from the starting noise and ignored the prompt (50% at step 4000)."""
    train_text_encoder: bool = False
    """False: the CLIP text encoder keeps its seeded random initialisation and only the UNet learns. Trained jointly
    (run teacher3, 6,200 steps), the encoder collapsed 'left' and 'right' to the same output (relative difference
    0.02 against 0.23 at initialisation) while top/bottom survived only through their token counts: position stayed
    at chance between left and right (63%). A frozen random encoder keeps every token distinct, and its outputs are
    computed once per caption, which also makes a step ~20% cheaper."""
    unet_channels: tuple[int, ...] = (32, 64, 128)
    """4.2M parameters: 0.86 s/step at batch 64 on 2 CPU threads, half the cost of (64, 128, 128)."""
    layers_per_block: int = 1
    text_hidden: int = 128
    text_layers: int = 3
    max_tokens: int = 32
    """Captions are at most ~18 CLIP tokens; 32 positions instead of SD's 77 save cross-attention time."""


def build_unet(recipe: TeacherRecipe) -> nn.Module:
    from diffusers import UNet2DConditionModel

    n = len(recipe.unet_channels)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=recipe.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        layers_per_block=recipe.layers_per_block, cross_attention_dim=recipe.text_hidden,
        attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip


def teacher_tokenizer(recipe: TeacherRecipe) -> Any:
    tokenizer = load_toy_tokenizer()
    tokenizer.model_max_length = recipe.max_tokens
    return tokenizer


def build_text_encoder(recipe: TeacherRecipe, vocab_size: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = teacher_tokenizer(recipe)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=recipe.text_hidden, intermediate_size=recipe.text_hidden * 4,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=recipe.max_tokens,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        projection_dim=recipe.text_hidden,
    )  # fmt: skip
    return CLIPTextModel(config)


class LatentBatches:
    """Endless seeded batches of (latent mean, latent std, token ids) over a precomputed set.

    Iterating again restarts from the beginning, so the trainer's resume (skip consumed batches) is exact."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int):
        self.mean, self.std, self.ids, self.batch_size, self.seed = mean, std, ids, batch_size, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n, epoch = self.mean.shape[0], 0
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield {"mean": self.mean[idx], "std": self.std[idx], "ids": self.ids[idx]}
            epoch += 1


class FrozenTextCache:
    """The frozen text encoder's last hidden states, computed once per distinct token sequence."""

    def __init__(self, text_encoder: nn.Module, ids: torch.Tensor):
        self.keys = torch.unique(ids, dim=0)
        with torch.no_grad():
            self.hidden = torch.cat([text_encoder(chunk)[0] for chunk in self.keys.split(256)])
        self.index = {tuple(row.tolist()): i for i, row in enumerate(self.keys)}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = [self.index.get(tuple(row.tolist())) for row in ids]
        if any(r is None for r in rows):
            raise KeyError("a token sequence outside the cached training captions")
        return self.hidden[torch.tensor(rows)]


@torch.no_grad()
def encode_training_set(vae: nn.Module, recipe: ToyRunRecipe) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    scenes = sample_scenes(recipe.num_train_images, recipe.seed)
    means, stds = [], []
    for start in tqdm(range(0, len(scenes), 500), desc="encoding toy images"):
        chunk = scenes[start : start + 500]
        seeds = [sample_seed(recipe.seed, start + i) for i in range(len(chunk))]
        pixels = torch.from_numpy(render_array(chunk, seeds)).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), [s.caption() for s in scenes]


def save_pipeline(
    out: Path, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, tokenizer: Any, dtype=torch.float16
) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(dtype)
    # transformers loads a model in its stored dtype, diffusers upcasts to fp32: a half-precision text encoder
    # beside an fp32 UNet would fail a plain from_pretrained. The encoder is small; keep it fp32.
    pipe.text_encoder.to(torch.float32)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


@torch.no_grad()
def prompt_accuracy_of(
    pipeline_dir: Path | Any, n: int, steps: int = 50, guidance: float = TOY_GUIDANCE_SCALE, seed: int = 1
) -> dict:
    """Teacher quality: DDIM at `steps` with guidance, scored by the pixel checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lcmkit.toy.checker import attribute_accuracy, prompt_accuracy

    pipe = pipeline_dir
    if not hasattr(pipe, "unet"):
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, **dtype_kwarg(torch.float32))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.caption() for s in sample_scenes(n, 10_000 + seed)]
    images = []
    for start in range(0, n, 50):
        batch = prompts[start : start + 50]
        g = torch.Generator().manual_seed(seed + start)
        images.extend(
            pipe(
                batch,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=32,
                width=32,
                generator=g,
                output_type="np",
            ).images
        )  # list += ndarray would call numpy's __radd__
    images = [(im * 255).round().astype(np.uint8) for im in images]
    return {"prompt_accuracy": prompt_accuracy(images, prompts), **attribute_accuracy(images, prompts)}


def open_run(recipe: ToyRunRecipe, record: dict[str, Any]) -> Path:
    """Start (or resume) a toy teacher run: its folder, its recipe.json, one more line of sessions.jsonl (where each
    stretch of a resumed run ran: the model card's CPU), the thread count and the seed."""
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(record, indent=2))
    with open(out / "sessions.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "cpu": cpu_model(), "threads": torch.get_num_threads()}) + "\n")
    torch.manual_seed(recipe.seed)
    return out


def run_recipe(
    accelerator: Any, recipe: ToyRunRecipe, update: Update, batches: Any, state: dict[str, Any], update_ema: Any,
    evaluate: Any, finish: Any, description: str, resume: bool, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """A toy teacher's training with lcmkit's Trainer: checkpoints (the 2 newest), EMA after each step, an evaluation
    every recipe.eval_every steps, `finish()` (save the pipeline) at the end; resumes from the latest checkpoint."""
    out = Path(recipe.out)
    loop = LoopSettings(max_steps=recipe.steps, batch_size=recipe.batch_size,
                        checkpoint_every=recipe.checkpoint_every, checkpoints_total_limit=2,
                        log_every=min(50, recipe.checkpoint_every), progress=progress)  # fmt: skip
    trainer = Trainer(accelerator, loop, out, [update], batches, state=state, on_step_end=update_ema,
                      callback=evaluate, callback_every=recipe.eval_every, description=description)  # fmt: skip
    if resume:
        trainer.resume("latest")
    t0 = time.time()
    result = trainer.run()
    finish()
    summary = {"steps": result.steps, "session_wall_s": time.time() - t0, "median_s_per_step": result.median_s_per_step}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_teacher(recipe: TeacherRecipe, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_scheduler

    out = open_run(recipe, asdict(recipe))
    vae = AutoencoderKL.from_pretrained(recipe.vae).eval().requires_grad_(False)
    tokenizer = teacher_tokenizer(recipe)
    cache = out / "latents.safetensors"
    if cache.is_file():
        from safetensors.torch import load_file

        data = load_file(cache)
        mean, std, ids = data["mean"], data["std"], data["ids"]
    else:
        from safetensors.torch import save_file

        mean, std, captions = encode_training_set(vae, recipe)
        ids = tokenizer(
            captions, padding="max_length", max_length=recipe.max_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        save_file({"mean": mean.contiguous(), "std": std.contiguous(), "ids": ids.contiguous()}, cache)
    empty_ids = tokenizer([""], padding="max_length", max_length=recipe.max_tokens, return_tensors="pt").input_ids

    model = nn.ModuleDict({"unet": build_unet(recipe), "text_encoder": build_text_encoder(recipe, len(tokenizer))})
    encode_ids: Any = None
    if not recipe.train_text_encoder:
        model["text_encoder"].requires_grad_(False).eval()
        encode_ids = FrozenTextCache(model["text_encoder"], torch.cat([ids, empty_ids]))
    ema = copy.deepcopy(model).requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.01)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=recipe.warmup_steps)
    with accelerator_session() as accelerator:
        model, optimizer = accelerator.prepare(model, optimizer)
        alphas_cumprod = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
        scaling = float(vae.config.scaling_factor)
        generator = torch.Generator().manual_seed(recipe.seed + 1)

        def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            b = batch["mean"].shape[0]
            z0 = (batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=generator)) * scaling
            ids = batch["ids"].clone()
            drop = torch.rand(b, generator=generator) < recipe.cond_dropout  # classifier-free guidance training
            ids[drop] = empty_ids
            t = torch.randint(0, 1000, (b,), generator=generator)
            eps = torch.randn(z0.shape, generator=generator)
            eps = eps + recipe.offset_noise * torch.randn(b, z0.shape[1], 1, 1, generator=generator)
            abar = alphas_cumprod[t].view(b, 1, 1, 1)
            z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
            hidden = model["text_encoder"](ids)[0] if encode_ids is None else encode_ids(ids)
            return F.mse_loss(model["unet"](z_t, t, encoder_hidden_states=hidden).sample, eps), {}

        @torch.no_grad()
        def update_ema() -> None:
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - recipe.ema_decay)

        def evaluate(step: int) -> None:
            pipe_dir = out / "eval-pipeline"
            save_pipeline(pipe_dir, ema["unet"], ema["text_encoder"], vae, tokenizer, dtype=torch.float32)
            result = {"step": step, "time": time.time(), **prompt_accuracy_of(pipe_dir, recipe.eval_images)}
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            tqdm.write(f"step {step}: prompt accuracy {result['prompt_accuracy']:.3f}")

        update = Update("teacher", model, optimizer, lr_scheduler, loss_fn, max_grad_norm=1.0)
        return run_recipe(
            accelerator, recipe, update, LatentBatches(mean, std, ids, recipe.batch_size, recipe.seed),
            {"model": model, "ema": ema, "noise": GeneratorState(generator)}, update_ema, evaluate,
            lambda: save_pipeline(out / "teacher", ema["unet"], ema["text_encoder"], vae, tokenizer), "toy teacher",
            resume, progress,
        )  # fmt: skip
