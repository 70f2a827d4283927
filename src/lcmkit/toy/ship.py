"""Ship a trained toy teacher into the package: copy its fp16 pipeline, measure it, write its model card.

`lcmkit toy ship-teacher --run DIR` takes the folder of `lcmkit toy train-teacher` (its teacher/ folder, recipe,
training log and in-training evaluations), evaluates the teacher with `lcmkit eval`'s own code on held-out toy
prompts (DDIM and DPM-Solver++ with guidance, scored by the pixel checker and the probe), and writes the folder
that ships under lcmkit/toy/assets/teacher: the pipeline, README.md (how it was made, how long it took, what it
scores), eval.json and grid.png.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from lcmkit.errors import ConfigError
from lcmkit.toy.probe import REFERENCE_N
from lcmkit.toy.world import TOY_GUIDANCE_SCALE

SHIPPED_TEACHER = Path(__file__).parent / "assets" / "teacher"
SHIPPED_FLOW_TEACHER = Path(__file__).parent / "assets" / "flow_teacher"
MAX_GAP_S = 900.0
"""Log records further apart than this span a stop (session end, pause); the gap is not training time."""


def training_time(log_file: Path) -> dict[str, float]:
    """Compute time of a (possibly many times resumed) run from its train_log.jsonl: the sum of the intervals
    between consecutive records that advance the step and lie less than MAX_GAP_S apart (in-training
    evaluations included). `stops` counts the gaps left out."""
    records = read_jsonl(log_file)
    compute, stops = 0.0, 0
    for before, after in zip(records, records[1:]):
        dt = after["time"] - before["time"]
        if after["step"] > before["step"] and 0 <= dt < MAX_GAP_S:
            compute += dt
        else:
            stops += 1
    span = records[-1]["time"] - records[0]["time"] if records else 0.0
    return {"compute_s": compute, "stops": stops, "span_s": span, "steps": records[-1]["step"] if records else 0}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; none when it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_parameters(folder: Path) -> dict[str, int]:
    from lcmkit.formats.info import safetensors_header

    parts = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    return {
        part: sum(math.prod(shape) for file in (folder / part).glob("*.safetensors")
                  for shape in safetensors_header(file)[0].values())
        for part in parts if (folder / part).is_dir()
    }  # fmt: skip


def replace_dir(staging: Path, out: Path) -> None:
    """Put `staging` in place of `out`; the old folder goes only once the new one is in place."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def ship_teacher(run: Path, out: Path | None = None, n_eval: int = 300, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Copy run/teacher to `out` (default: where the package keeps that kind of toy teacher), evaluate it there and
    write its card. Returns the card's numbers."""
    from lcmkit.measure.eval import EvalSettings, run_eval
    from lcmkit.toy.demo import toy_prompts, toy_scores

    teacher = run / "teacher"
    if not (teacher / "model_index.json").is_file():
        raise ConfigError(f"--run {run}: no finished teacher ({teacher}/model_index.json is missing): let "
                          "lcmkit toy train-teacher reach its last step")  # fmt: skip
    recipe = json.loads((run / "recipe.json").read_text())
    flow = recipe.get("family") == "sd3"  # a run of lcmkit toy train-flow-teacher
    out = out or (SHIPPED_FLOW_TEACHER if flow else SHIPPED_TEACHER)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} already holds a teacher: pass --overwrite to replace it")
    timing = training_time(run / "logs" / "train_log.jsonl")
    history, sessions = read_jsonl(run / "eval.jsonl"), read_jsonl(run / "sessions.jsonl")

    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(teacher, staging)
    # the UNet teacher: DDIM and DPM-Solver++ at 4, 25, 50; the flow teacher: its Euler (and DPM-Solver++ on its
    # flow sigmas) at 1, 2, 4, SD3's 28 and the reference 50
    kind = dict(teacher_steps=[1, 2, 4, 28, 50], teacher_samplers=("euler", "dpm++")) if flow else dict(
        steps=[4], reference_steps=(25, 50))  # fmt: skip
    settings = EvalSettings(
        teacher=str(staging), prompts=toy_prompts(n_eval, seed=1), guidance=TOY_GUIDANCE_SCALE, seed=1, size=32,
        batch_size=50, grid_rows=6, out=str(staging / "evaluation"), progress=progress, **kind,
    )  # fmt: skip
    result = run_eval(settings, [toy_scores])
    evaluation = json.loads((staging / "evaluation" / "eval.json").read_text())
    for name in ("eval.md", "quality.png"):
        (staging / "evaluation" / name).unlink(missing_ok=True)
    facts = {
        "recipe": recipe, "training": timing, "history": history, "sessions": sessions, "evaluation": evaluation,
        "parameters": count_parameters(staging), "n_eval": n_eval, "eval_seconds": result["total_s"],
    }  # fmt: skip
    (staging / "README.md").write_text((flow_teacher_card if flow else teacher_card)(facts, result["table"]))
    facts["size_mb"], facts["out"] = folder_mb(staging), str(out)
    replace_dir(staging, out)
    return facts


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def teacher_card(facts: dict[str, Any], table: str) -> str:
    recipe, params = facts["recipe"], facts["parameters"]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()
                     if k in ("steps", "batch_size", "learning_rate", "seed"))  # fmt: skip
    return f"""---
license: apache-2.0
library_name: diffusers
tags: [lcmkit, toy, text-to-image, stable-diffusion]
---
# lcmkit toy teacher

A tiny Stable Diffusion trained from scratch on lcmkit's synthetic toy world (32x32 images of one shape:
3 shapes x 6 colours x 5 positions x 2 sizes x 2 backgrounds, captions such as "a small red circle at the
top left on a white background"). It is `lcmkit demo`'s teacher: a plain diffusers `StableDiffusionPipeline`
folder (epsilon prediction, Stable Diffusion's scaled-linear noise schedule, the real `CLIPTokenizer` with a
2,514-token BPE vocabulary), so distilling it runs exactly the code path used for Stable Diffusion.

| part | parameters |
| --- | --- |
| UNet2DConditionModel (blocks {tuple(recipe["unet_channels"])}, cross-attention {recipe["text_hidden"]}) | \
{params["unet"] / 1e6:.2f}M |
| CLIPTextModel ({recipe["text_layers"]} layers x {recipe["text_hidden"]}, \
{"trained" if recipe.get("train_text_encoder") else "frozen at its seeded initialisation"}) | \
{params["text_encoder"] / 1e6:.2f}M |
| AutoencoderKL (trained first, 16x16x4 latents; lcmkit/toy/assets/vae) | {params["vae"] / 1e6:.2f}M |

UNet and VAE weights are stored in fp16, the text encoder in fp32 (safetensors); a plain `from_pretrained` loads
them all in fp32, which is what a CPU wants.

## How it was made

```
lcmkit toy train-teacher --out DIR {flags}
lcmkit toy ship-teacher --run DIR
```

{recipe["steps"]:,} steps of AdamW (lr {recipe["learning_rate"]:g}, constant after {recipe["warmup_steps"]} warm-up
steps), batch {recipe["batch_size"]}, EMA {recipe["ema_decay"]} (the EMA weights are shipped), 10% caption
dropout for classifier-free guidance, offset noise {recipe["offset_noise"]}, on {recipe["num_train_images"]:,}
rendered scenes (seed {recipe["seed"]}) encoded once by the toy VAE.
{_made(facts)} The full recipe is in recipe.json beside this card.

## What it scores

{facts["n_eval"]} held-out toy prompts (seed 1), guidance 5, the same initial noise for every sampler.
Prompt accuracy: every attribute of the prompt read back from the pixels by lcmkit's procedural checker;
probe-FD: Frechet distance of the shipped attribute probe's features against {REFERENCE_N:,} real held-out renders
(the FID recipe with the probe in place of Inception); PSNR/MS-SSIM against the DDIM 50-step image of the
same noise. Seconds per image: batches of 50 on the CPU above.

{table}

evaluation/grid.png shows the first prompts for every sampler; evaluation/eval.json holds every number.

During training (DDIM 50, guidance 5, {recipe["eval_images"]} prompts, EMA weights):

| step | prompt accuracy | shape | colour | position | size | background |
| --- | --- | --- | --- | --- | --- | --- |
{_history(facts)}

## Use

```python
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("lcmkit/toy/assets/teacher", torch_dtype=torch.float32)
image = pipe("a large blue square in the center on a black background", height=32, width=32,
             guidance_scale={TOY_GUIDANCE_SCALE}, num_inference_steps=25).images[0]
```

It knows only the toy world: anything else in a prompt is ignored or confuses it.
"""


def _made(facts: dict[str, Any]) -> str:
    """Where and how long it trained: the CPU(s) of its sessions and the compute time of its log."""
    from lcmkit.measure.system import cpu_model

    recipe, timing = facts["recipe"], facts["training"]
    cpus = " / ".join(sorted({m["cpu"] for m in facts.get("sessions", []) if m.get("cpu")}) or [cpu_model()])
    return (f"Trained on {cpus} with {recipe['num_threads'] or 'all'} threads: **{_hours(timing['compute_s'])} of "
            f"compute** (from the training log; {timing['stops']} stops and resumes across sessions, "
            f"{_hours(timing['span_s'])} from first to last step).")  # fmt: skip


def _history(facts: dict[str, Any]) -> str:
    return "\n".join(
        f"| {h['step']} | {h['prompt_accuracy']:.0%} | "
        + " | ".join(f"{h.get(a, float('nan')):.0%}" for a in ("shape", "colour", "position", "size", "background"))
        + " |"
        for h in facts["history"]
    )


def flow_teacher_card(facts: dict[str, Any], table: str) -> str:
    recipe, params = facts["recipe"], facts["parameters"]
    text = sum(params.get(f"text_encoder{s}", 0) for s in ("", "_2", "_3"))
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()
                     if k in ("steps", "batch_size", "learning_rate", "seed"))  # fmt: skip
    width = recipe["num_heads"] * recipe["head_dim"]
    return f"""---
license: apache-2.0
library_name: diffusers
tags: [lcmkit, toy, text-to-image, stable-diffusion-3, rectified-flow]
---
# lcmkit toy flow teacher

A tiny Stable Diffusion 3 trained from scratch by rectified flow on lcmkit's synthetic toy world (32x32 images of
one shape: 3 shapes x 6 colours x 5 positions x 2 sizes x 2 backgrounds, captions such as "a small red circle at
the top left on a white background"). It is `lcmkit demo --flow`'s teacher: a plain diffusers
`StableDiffusion3Pipeline` folder (MMDiT, CLIP-L + CLIP-G + T5, `FlowMatchEulerDiscreteScheduler` with shift
{recipe["shift"]:g}), so distilling it runs exactly the code path lcmkit uses for SD3 and SD3.5.

| part | parameters |
| --- | --- |
| SD3Transformer2DModel ({recipe["num_layers"]} joint blocks x {width}, patch 2, 64 image tokens) | \
{params.get("transformer", 0) / 1e6:.2f}M |
| CLIP-L + CLIP-G (with projections, {recipe["text_layers"]} layers x {recipe["text_hidden"]} each) and T5 \
({recipe["t5_dim"]} wide), all frozen at their seeded initialisation | {text / 1e6:.2f}M |
| AutoencoderKL (the toy VAE, 16x16x4 latents; shift factor 0 for SD3's pipeline) | {params.get("vae", 0) / 1e6:.2f}M |

The tokenizers are short: CLIP {recipe["clip_tokens"]} positions, T5 {recipe["t5_tokens"]}. Call the pipeline
with `max_sequence_length={recipe["t5_tokens"]}` (lcmkit does this by itself: it reads the T5 tokenizer's length).
Transformer and VAE weights are stored in fp16, the text encoders in fp32 (safetensors).

## How it was made

```
lcmkit toy train-flow-teacher --out DIR {flags}
lcmkit toy ship-teacher --run DIR
```

{recipe["steps"]:,} steps of AdamW (lr {recipe["learning_rate"]:g}, constant after {recipe["warmup_steps"]} warm-up
steps), batch {recipe["batch_size"]}, EMA {recipe["ema_decay"]} (the EMA weights are shipped),
{recipe["cond_dropout"]:.0%} caption dropout for classifier-free guidance; the velocity eps - z0 regressed at
sigma = sigmoid(u), u ~ N({recipe["logit_mean"]:g}, {recipe["logit_std"]:g}) (SD3's logit-normal density), on
{recipe["num_train_images"]:,} rendered scenes (seed {recipe["seed"]}) encoded once by the toy VAE.
{_made(facts)} The full recipe is in recipe.json beside this card.

## What it scores

{facts["n_eval"]} held-out toy prompts (seed 1), guidance {TOY_GUIDANCE_SCALE:g}, the same initial noise for every
sampler. Prompt accuracy: every attribute of the prompt read back from the pixels by lcmkit's procedural checker;
probe-FD: Frechet distance of the shipped attribute probe's features against {REFERENCE_N:,} real held-out renders
(the FID recipe with the probe in place of Inception); PSNR/MS-SSIM against the teacher's Euler 50-step image of the
same noise. Seconds per image: batches of 50 on the CPU above.

{table}

evaluation/grid.png shows the first prompts for every sampler; evaluation/eval.json holds every number.

During training (Euler 28, guidance {TOY_GUIDANCE_SCALE:g}, {recipe["eval_images"]} prompts, EMA weights):

| step | prompt accuracy | shape | colour | position | size | background |
| --- | --- | --- | --- | --- | --- | --- |
{_history(facts)}

## Use

```python
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("lcmkit/toy/assets/flow_teacher", torch_dtype=torch.float32)
image = pipe("a large blue square in the center on a black background", height=32, width=32,
             guidance_scale={TOY_GUIDANCE_SCALE}, num_inference_steps=28,
             max_sequence_length={recipe["t5_tokens"]}).images[0]
```

It knows only the toy world: anything else in a prompt is ignored or confuses it.
"""
