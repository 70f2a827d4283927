"""Model cards: every finished distill folder explains itself.

The card is built from the folder alone (lcmkit_run.json, the weights, the validation grids), so it can be
written at the end of a run and rewritten later (after `lcmkit export kohya`, say) by `lcmkit push`.
The YAML header comes from huggingface_hub's ModelCardData."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcmkit.errors import ConfigError
from lcmkit.families import get_family
from lcmkit.families.base import Family
from lcmkit.infer.sampling import LCMSCHEDULER_DEFAULT_GRID, default_guidance_scale, grid_sigmas, guidance_scale
from lcmkit.methods import METHODS
from lcmkit.methods.lcd import LCDSettings
from lcmkit.methods.tcd import PCMSettings

CARD = "README.md"


METHOD_NAMES = {"lcd": "Latent Consistency Distillation", "tcd": "Trajectory Consistency Distillation",
                "pcm": "phased consistency distillation (PCM)"}  # fmt: skip


RUN_RECORD = "lcmkit_run.json"


LORA_FILE = "pytorch_lora_weights.safetensors"


def _record(out: Path) -> dict[str, Any]:
    path = out / RUN_RECORD
    if not path.is_file():
        raise ConfigError(f"{out} holds no finished lcmkit run ({RUN_RECORD} is missing)")
    return json.loads(path.read_text())


def teacher_license(teacher: str) -> str | None:
    """The license field of the teacher's own card: a local folder's README.md, or the hub's when reachable."""
    from huggingface_hub import ModelCard

    local = Path(teacher).expanduser()
    try:
        if local.is_dir():
            card = ModelCard.load(local / CARD) if (local / CARD).is_file() else None
        elif local.exists():
            card = None
        else:
            card = ModelCard.load(teacher)
    except Exception:  # offline, gated, no card: the license stays unknown rather than guessed
        return None
    return getattr(card.data, "license", None) if card is not None else None


def latest_grid(out: Path) -> str | None:
    grids = sorted((out / "validation").glob("step-*.png"))
    return f"validation/{grids[-1].name}" if grids else None


def flow_snippet(record: dict[str, Any], weights: str, family: Family) -> str:
    """SD3/FLUX: FlowMatchLCMScheduler with the teacher's shift; it re-noises between steps from torch's global
    generator (the pipelines pass it no generator), so seed torch for a repeatable image."""
    teacher, lora = record["config"]["model"]["teacher"], record["mode"] == "lora"
    guidance = default_guidance_scale(not lora, family)
    if lora:
        load = (f'pipe = {family.pipeline}.from_pretrained("{teacher}", torch_dtype=torch.bfloat16)\n'
                "pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)\n"
                f'pipe.load_lora_weights("{weights}")')  # fmt: skip
    else:
        weights = str(Path(weights) / "pipeline") if Path(weights).is_dir() else weights
        load = (f'pipe = {family.pipeline}.from_pretrained("{weights}", torch_dtype=torch.bfloat16)'
                "  # FlowMatchLCMScheduler inside")
    return f'''import torch
from diffusers import {family.pipeline}, FlowMatchLCMScheduler

{load}
pipe.to("cuda")
torch.manual_seed(0)  # FlowMatchLCMScheduler draws its re-noising from torch's global generator
image = pipe("a photo of a cat", num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25],
              guidance_scale={guidance}).images[0]
image.save("cat.png")'''


def sampler_of(record: dict[str, Any]) -> tuple[str, int, str]:
    """(diffusers scheduler, steps, eta argument) a UNet student of the run's method samples with, as the method
    object says: LCD LCMScheduler; TCD TCDScheduler at its gamma; PCM TCDScheduler at gamma 0 in K steps."""
    cfg = record["config"]
    name = cfg.get("method", "lcd")
    method = METHODS[name](LCDSettings(), PCMSettings(**cfg["pcm"]) if name == "pcm" else None)
    eta = "" if method.eta is None else f", eta={method.eta}"
    return method.scheduler, method.sampling_steps(), eta


def usage_snippet(record: dict[str, Any], weights: str) -> str:
    """A diffusers snippet for this output; `weights` is where the LoRA or pipeline lives (a repo id or a path)."""
    teacher, family, mode = record["config"]["model"]["teacher"], get_family(record["family"]), record["mode"]
    if family.flow:
        return flow_snippet(record, weights, family)
    if mode == "lora":
        pipe_cls = family.pipeline
        n = record["config"]["lcd"]["num_ddim_timesteps"]  # the grid it was distilled on: sample on the same one
        grid = "" if n == LCMSCHEDULER_DEFAULT_GRID else f", original_inference_steps={n}"
        scheduler, steps, eta = sampler_of(record)
        guidance = default_guidance_scale(False)
        return f'''import torch
from diffusers import {pipe_cls}, {scheduler}

pipe = {pipe_cls}.from_pretrained("{teacher}")
pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config{grid})
pipe.load_lora_weights("{weights}")
image = pipe("a photo of a cat", num_inference_steps={steps}{eta}, guidance_scale={guidance}).images[0]
image.save("cat.png")'''
    pipe_cls = family.lcm_pipeline
    if Path(weights).is_dir():  # a local distill folder: the pipeline is in pipeline/ (a pushed repo has it at the top)
        weights = str(Path(weights) / "pipeline")
    scheduler, steps, eta = sampler_of(record)
    swap = "" if scheduler == "LCMScheduler" else f"\npipe.scheduler = {scheduler}.from_config(pipe.scheduler.config)"
    guidance = default_guidance_scale(True)
    return f'''import torch
from diffusers import {pipe_cls}{", " + scheduler if swap else ""}

pipe = {pipe_cls}.from_pretrained("{weights}")  # LCMScheduler inside{swap}
image = pipe("a photo of a cat", num_inference_steps={steps}{eta}, guidance_scale={guidance}).images[0]
image.save("cat.png")'''


def model_card(out: Path, repo_id: str | None = None) -> Any:
    """The ModelCard of a finished distill folder (not written)."""
    from huggingface_hub import ModelCard, ModelCardData

    out = Path(out)
    r = _record(out)
    cfg, teacher, family, mode = r["config"], r["config"]["model"]["teacher"], get_family(r["family"]), r["mode"]
    lora = mode == "lora"
    tags = ["lcm", "latent-consistency-model", "text-to-image", "diffusers", "lcmkit",
            family.hub_tag] + (["lora"] if lora else [])  # fmt: skip
    data = ModelCardData(
        base_model=teacher, library_name="diffusers", license=teacher_license(teacher), tags=tags,
        pipeline_tag="text-to-image", inference=True,
    )  # fmt: skip
    rank, alpha = cfg["lora"]["lora_rank"], cfg["lora"]["lora_alpha"] or cfg["lora"]["lora_rank"]
    what = (f"an **LCM-LoRA** (rank {rank}, alpha {alpha})" if lora
            else f"a **full Latent Consistency Model** ({full_student_text(family, cfg['lcd'])})")  # fmt: skip
    from lcmkit.families.teacher import looks_like_hub_id

    named = f"[{teacher}](https://huggingface.co/{teacher})" if looks_like_hub_id(teacher) else f"`{teacher}`"
    kohya = sorted(p.name for p in out.glob("*_kohya.safetensors"))
    grid = latest_grid(out)
    s_step = r.get("median_s_per_step")
    hardware = r.get("machine", {}).get("gpu") or r.get("machine", {}).get("processor") or r.get("device", "?")
    lines = [
        f"# {repo_id or out.name}",
        "",
        f"This is {what} distilled from {named} "
        f"({family.label}, {prediction_text(r.get('prediction_type', 'epsilon'))}) "
        f"with lcmkit by {METHOD_NAMES.get(cfg.get('method', 'lcd'), 'Latent Consistency Distillation')}: it "
        "generates in 2-8 "
        "steps instead of 25-50.",
        "",
        "## Use it",
        "",
        "```python",
        usage_snippet(r, repo_id or str(out)),
        "```",
        "",
        guidance_text(family, lora, cfg["lcd"]) + method_text(cfg, family),
        "",
    ]  # fmt: skip
    if family.flow and lora:
        lines += [
            f"ComfyUI: `lcmkit export kohya {LORA_FILE} --out lcm_lora_comfy.safetensors` writes the same weights "
            "with the alphas ComfyUI reads (its loader maps diffusers `transformer.` keys of SD3 and FLUX); load it "
            "with a LoRA loader on the base model and sample with the lcm sampler, 4 steps. AUTOMATIC1111 has no "
            f"{family.label} support.",
            "",
        ]
    elif family.flow:
        lines += ["ComfyUI / AUTOMATIC1111: lcmkit does not write SD3/FLUX single-file checkpoints yet; load the "
                  "diffusers pipeline folder above.", ""]
    elif lora:
        lines += [
            "ComfyUI / AUTOMATIC1111: "
            + (f"drop `{kohya[0]}` into `models/loras` (ComfyUI) or `models/Lora` (AUTOMATIC1111) and sample "
               "with the LCM sampler, 4 steps, CFG 1-2."
               if kohya else f"convert with `lcmkit export kohya {LORA_FILE} --out lcm_lora_kohya.safetensors`, "
               "drop the result into `models/loras` (ComfyUI) or `models/Lora` (AUTOMATIC1111), sample with the "
               "LCM sampler, 4 steps, CFG 1-2."),
            "",
        ]  # fmt: skip
    else:
        lines += [
            "ComfyUI / AUTOMATIC1111: write a single-file checkpoint with `lcmkit export single-file pipeline "
            "--out lcm.safetensors`, put it into `models/checkpoints` (ComfyUI) or `models/Stable-diffusion` "
            "(AUTOMATIC1111), sample with the LCM sampler, 4 steps.",
            "",
        ]
    best = r.get("best")
    if best:
        lines += [
            f"**Which weights.** The files above are the last step's ({r['steps']}). Quality was watched while "
            f"training ({best['metric']}): the best was step {best['step']}, {best['psnr_mean']:.2f} dB, and its "
            "weights are in `best/`" + (" (the same step)." if best["step"] == r["steps"] else ": use them if the "
            "last step scores lower (`logs/quality.jsonl` has every score)."),
            "",
        ]  # fmt: skip
    if grid:
        lines += ["## Samples", "", f"![validation grid: rows are prompts, columns step counts]({grid})", ""]
    lines += [
        "## How it was made",
        "",
        f"- Command: `{r.get('command') or 'lcmkit distill (from the Python API)'}`",
        f"- Data: `{r.get('data', {}).get('source', cfg['data']['data'])}`, resolution {cfg['data']['resolution']}",
        f"- {r['steps']} steps, batch {cfg['train']['batch_size']} x {r.get('num_processes', 1)} process(es), "
        f"learning rate {cfg['optim']['learning_rate']}, w in [{cfg['lcd']['w_min']}, {cfg['lcd']['w_max']}], "
        f"{cfg['lcd']['num_ddim_timesteps']} {'sigma' if family.flow else 'DDIM'} solver steps, "
        f"{cfg['lcd']['loss']} loss",
        f"- Time: {r.get('wall_s', 0):.0f} s in all"
        + (f", {s_step:.3f} s per step" if s_step else "")
        + f" on {hardware} ({r.get('device', '?')}), peak RSS {r.get('peak_rss_mb', 0):.0f} MB"
        + (f", peak GPU memory {r['peak_gpu_mb']:.0f} MiB" if r.get("peak_gpu_mb") else ""),
        "- Library versions: " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()),
        f"- The exact configuration is in `{RUN_RECORD}`.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def prediction_text(prediction_type: str) -> str:
    return "rectified flow, velocity prediction" if prediction_type == "flow" else f"{prediction_type} prediction"


def full_student_text(family: Family, lcd: dict[str, Any]) -> str:
    if not family.flow:
        return "a UNet that takes the guidance scale w as input"
    if family.guidance_distilled:
        return (f"the {family.label} transformer, its guidance input trained for guidance_scale "
                f"{guidance_scale(lcd['w_min']):g}-{guidance_scale(lcd['w_max']):g}")  # fmt: skip
    return (f"the {family.label} transformer with guidance_scale {guidance_scale(lcd['w_min']):g} baked in: it has no "
            "guidance input")  # fmt: skip


FLOW_SAMPLING = ("Sample with diffusers' FlowMatchLCMScheduler (as of diffusers 0.42) at sigmas 1 - i/N (for 4 steps "
                 "1, 0.75, 0.5, 0.25, which the scheduler shifts): StableDiffusion3Pipeline's own 4-step grid under it "
                 "ends at sigma 0.009 and wastes the last step.")


def guidance_text(family: Family, lora: bool, lcd: dict[str, Any]) -> str:
    """What guidance_scale to pass, per family and mode."""
    lo, hi = guidance_scale(lcd["w_min"]), guidance_scale(lcd["w_max"])
    trained = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    fine_tunes = " The LoRA also works on fine-tunes of the same base model." if lora else ""
    if family.guidance_distilled:
        return (f"Steps 2-8 (4 is a good default), guidance_scale {trained}: {family.label}'s own guidance input, the "
                f"range the student was trained on (no classifier-free guidance pass is run). {FLOW_SAMPLING}"
                + fine_tunes)  # fmt: skip
    if family.flow:
        return (f"Steps 2-8 (4 is a good default), guidance_scale 1.0: the student learned the guided ODE for "
                f"guidance {trained}, and a value above 1 runs a second, classifier-free pass. {FLOW_SAMPLING}"
                + fine_tunes)  # fmt: skip
    if lora:
        return ("Steps 2-8 (4 is a good default), guidance 1.0-2.0 (1.0 disables classifier-free guidance; with a "
                "negative prompt use 1.5-2)." + fine_tunes)
    return ("Steps 2-8 (4 is a good default), guidance 4-13 (the w input; no classifier-free guidance pass is run, "
            "so each step costs one UNet call).")


def method_text(cfg: dict[str, Any], family: Family) -> str:
    """What sampling a TCD or PCM student needs beyond the family's advice."""
    method = cfg.get("method", "lcd")
    if family.flow and method in ("tcd", "pcm"):
        n = cfg.get("lcd", {}).get("num_ddim_timesteps", LCDSettings.num_ddim_timesteps)
        k = cfg["pcm"]["num_phases"] if method == "pcm" else 4
        sigmas = ", ".join(f"{s:g}" for s in grid_sigmas(k, n))
        return (f" Distilled with {method.upper()}: diffusers has no flow-matching TCD scheduler, so the snippet's "
                "FlowMatchLCMScheduler is an approximation. Deterministic Euler steps between the trained end "
                "points match training: FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config) and "
                f"`num_inference_steps={k}, sigmas=[{sigmas}]` (the {n}-point grid's "
                f"{'phase edges' if method == 'pcm' else 'points'}); `lcmkit generate --scheduler euler` does this.")
    if method == "pcm":
        k = cfg["pcm"]["num_phases"]
        plural = "s" * (k > 1)
        return (f" Distilled with phased consistency (PCM, {k} phase{plural}): sample with TCDScheduler at eta 0 in "
                f"{k} step{plural}, which step edge to edge of the trained phases, deterministically, as in training; "
                f"a multiple of {k} steps also lands on every edge.")  # fmt: skip
    if method == "tcd":
        return " Distilled with TCD: sample with TCDScheduler (eta is TCD's gamma, 0.3 by default)."
    return ""


def write_model_card(out: Path, repo_id: str | None = None) -> Path:
    card = model_card(out, repo_id)
    path = Path(out) / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(str(card))
    tmp.replace(path)
    return path
