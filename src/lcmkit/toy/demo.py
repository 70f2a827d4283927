"""`lcmkit demo`: the main job on the embedded default, offline, on a CPU.

Distils the shipped toy teacher into an LCM-LoRA (or a full LCM) on toy-world shards with
`lcmkit distill`'s own code, then compares, on the same prompts and seeds:
teacher DPM-Solver++ 25 steps with guidance, teacher DPM-Solver++ 4 steps, and the LCM at 1, 2, 4, 8
steps. Writes a grid PNG, a metrics table (markdown + JSON: probe-FD, prompt accuracy, seconds per
image) and a plot of quality against steps and seconds per image.

`lcmkit demo --flow` does the same for the toy flow teacher (a tiny SD3, rectified flow): the distilled
model on FlowMatchLCMScheduler at 1, 2, 4 steps beside the teacher's own Euler at 1, 2, 4 and 28 steps.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lcmkit.distill.config import DistillConfig
from lcmkit.distill.recipe import distill
from lcmkit.errors import ConfigError
from lcmkit.infer.images import image_grid
from lcmkit.infer.pipelines import denoiser_of, initial_noise
from lcmkit.infer.sampling import DEFAULT_TCD_GAMMA, LORA_GUIDANCE_SCALE, lcm_lora_ddim_timesteps, w_of
from lcmkit.measure.eval import SAMPLER_LABELS, Column, sample_columns, sampler_columns, write_report
from lcmkit.methods.lcd import LCDSettings
from lcmkit.runtime import dtype_kwarg
from lcmkit.toy.world import IMAGE_SIZE, TOY_GUIDANCE_SCALE, make_splits, sample_scenes

ASSETS = Path(__file__).parent / "assets"
TEACHER_DIR, LORA_DIR = ASSETS / "teacher", ASSETS / "lcm_lora"
FLOW_TEACHER_DIR, FLOW_LORA_DIR = ASSETS / "flow_teacher", ASSETS / "flow_lora"


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    mode: str = "lora"
    flow: bool = False
    """The toy flow teacher (a tiny SD3) instead of the UNet one; some defaults differ (FLOW_DEFAULTS)."""
    teacher: str | None = None
    """Defaults to the shipped toy teacher (the flow one with --flow)."""
    steps: int = 240
    """LoRA steps of the live run: 240 keeps `make demo` within 10 minutes on a 2-core CPU (300 took 607 s)."""
    batch_size: int = 32
    learning_rate: float = 1e-4
    num_ddim_timesteps: int = LCDSettings.num_ddim_timesteps
    """N of the skipping-step grid (k = 1000 / N)."""
    lora_rank: int = 32
    guidance: float = TOY_GUIDANCE_SCALE
    """The teacher's classifier-free guidance scale; LCD learns it (w = guidance - 1)."""
    n_train: int = 20000
    n_test: int = 2000
    n_eval: int = 300
    grid_rows: int = 6
    lcm_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    shipped_lora: str | None = None
    """An LCM-LoRA of the same teacher shown beside the live run; default: the shipped toy LCM-LoRA when the
    teacher is the shipped one ("none" to leave it out)."""
    shipped_steps: list[int] = field(default_factory=lambda: [2, 4])
    tcd_steps: list[int] = field(default_factory=lambda: [4])
    """Step counts of the TCD sampler columns (live and shipped model)."""
    euler_steps: list[int] = field(default_factory=list)
    """--flow: step counts of the Euler columns (live and shipped model), deterministic steps on the training grid."""
    tcd_gamma: float = DEFAULT_TCD_GAMMA
    teacher_steps: int = 25
    """Steps of the teacher's reference column (DPM-Solver++; a flow teacher's Euler)."""
    teacher_few_steps: list[int] = field(default_factory=lambda: [4])
    """Step counts of the teacher's few-step columns, the same sampler."""
    seed: int = 0
    overwrite: bool = True
    progress: bool = True

    def check(self) -> None:
        from lcmkit.infer.schedulers import check_tcd_gamma

        check_tcd_gamma(self.tcd_gamma)
        if not 1 <= self.num_ddim_timesteps <= 1000:
            raise ConfigError(f"--num-ddim-timesteps {self.num_ddim_timesteps}: must be between 1 and 1000")

    @classmethod
    def make(cls, quick: bool = False, **given: Any) -> DemoSettings:
        """The settings for the given flags: --flow's defaults, then --quick's sizes, under what was given."""
        base = dict(FLOW_DEFAULTS) if given.get("flow") else {}
        if quick:  # a smoke-test sized demo (the test suite runs it)
            base.update(steps=20, batch_size=8, n_train=200, n_test=100, n_eval=8, grid_rows=2, lcm_steps=[1, 2, 4])
        return cls(**{**base, **given})

    @property
    def teacher_sampler(self) -> str:
        return "euler" if self.flow else "dpm++"


FLOW_DEFAULTS: dict[str, Any] = dict(
    out="runs/demo-flow", teacher_steps=28, teacher_few_steps=[1, 2, 4], lcm_steps=[1, 2, 4], tcd_steps=[],
    euler_steps=[2, 4], shipped_steps=[1, 2, 4],
)  # fmt: skip
"""--flow: the teacher's Euler at the distilled model's step counts and at SD3's 28; the distilled model on
FlowMatchLCMScheduler and, in place of TCD (which has no flow form), on Euler steps over its training grid (at 1 step
the same image as FlowMatchLCMScheduler's, so from 2)."""


def toy_teacher(folder: str | None = None, flow: bool = False) -> str:
    """A toy-world teacher folder (default: the shipped one, or the shipped flow teacher), checked."""
    path = Path(folder) if folder else FLOW_TEACHER_DIR if flow else TEACHER_DIR
    if not (path / "model_index.json").is_file():
        command = "train-flow-teacher" if flow else "train-teacher"
        raise ConfigError(f"toy teacher {path} not found: it ships with lcmkit once trained "
                          f"(lcmkit toy {command}), or pass --teacher DIR")  # fmt: skip
    return str(path)


def toy_lora(flow: bool = False) -> str:
    """The shipped toy LCM-LoRA folder (of the UNet or the flow teacher), checked."""
    folder = FLOW_LORA_DIR if flow else LORA_DIR
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise ConfigError(f"the toy LCM-LoRA {folder} is not in this build yet: pass --lora DIR (a distill output)")
    return str(folder)


def ensure_shards(folder: Path, settings: DemoSettings) -> dict[str, str]:
    """Write the toy train/test shards once (deterministic for the seed), reuse them afterwards."""
    stamp = folder / "splits.json"
    want = {"n_train": settings.n_train, "n_test": settings.n_test, "seed": settings.seed}
    if stamp.is_file() and json.loads(stamp.read_text()).get("params") == want:
        return json.loads(stamp.read_text())["specs"]
    splits = make_splits(folder, settings.n_train, settings.n_test, settings.seed)
    specs = {name: "::".join(paths) for name, paths in splits.items()}
    stamp.write_text(json.dumps({"params": want, "specs": specs}))
    return specs


def distill_config(settings: DemoSettings, teacher: str, data: str, out: Path) -> DistillConfig:
    cfg = DistillConfig(mode=settings.mode)
    cfg.model.teacher = teacher
    cfg.data.data = data
    cfg.data.resolution = IMAGE_SIZE
    cfg.data.shuffle_buffer = 500
    w = w_of(settings.guidance)
    # LoRA has no w input: it learns the teacher's ODE at the demo's guidance; a full LCM learns a range (a full
    # SD3 student has no guidance input either: one w).
    one_w = settings.mode == "lora" or settings.flow
    cfg.lcd.w_min, cfg.lcd.w_max = (w, w) if one_w else (max(w - 3.0, 0.0), w + 3.0)
    cfg.lcd.num_ddim_timesteps = settings.num_ddim_timesteps
    cfg.lora.lora_rank = settings.lora_rank
    cfg.optim.learning_rate = settings.learning_rate
    cfg.optim.adam_weight_decay = 0.0
    cfg.train.out = str(out)
    cfg.train.overwrite = settings.overwrite
    cfg.train.max_steps = settings.steps
    cfg.train.batch_size = settings.batch_size
    cfg.train.seed = settings.seed
    cfg.train.checkpoint_every = 0
    cfg.train.log_every = 10
    cfg.train.progress = settings.progress
    return cfg


def lora_pipeline(teacher: str, lora_dir: str | Path) -> Any:
    """The teacher with an LCM-LoRA fused in, on LCMScheduler over the DDIM grid the LoRA was distilled on (a flow
    teacher: on FlowMatchLCMScheduler)."""
    from diffusers import DiffusionPipeline, LCMScheduler

    from lcmkit.infer.schedulers import few_step_scheduler, is_flow

    lcm = DiffusionPipeline.from_pretrained(teacher, **dtype_kwarg(torch.float32))
    if is_flow(lcm.scheduler.config):
        lcm.scheduler = few_step_scheduler(lcm.scheduler.config, "lcm")
    else:
        n = lcm_lora_ddim_timesteps([(str(lora_dir), 1.0)])
        lcm.scheduler = LCMScheduler.from_config(lcm.scheduler.config, original_inference_steps=n)
    lcm.load_lora_weights(str(lora_dir))
    lcm.fuse_lora()
    lcm.set_progress_bar_config(disable=True)
    return lcm


def load_pipelines(settings: DemoSettings, teacher: str, run_dir: Path) -> tuple[Any, Any]:
    """(teacher pipeline, distilled pipeline with LCMScheduler)."""
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(teacher, **dtype_kwarg(torch.float32))
    base.set_progress_bar_config(disable=True)
    if settings.mode == "lora":
        return base, lora_pipeline(teacher, run_dir)
    # the plain pipeline feeds a full LCM's UNet w = guidance - 1 (no CFG) and, unlike
    # LatentConsistencyModelPipeline, passes TCD's gamma on to the scheduler
    lcm = DiffusionPipeline.from_pretrained(run_dir / "pipeline", **dtype_kwarg(torch.float32))
    lcm.set_progress_bar_config(disable=True)
    return base, lcm


def shipped_lora_steps(lora_dir: Path) -> int | None:
    record = lora_dir / "lcmkit_run.json"
    return json.loads(record.read_text()).get("steps") if record.is_file() else None


def columns_for(settings: DemoSettings, base: Any, lcm: Any, shipped: Any = None, shipped_grid: int | None = None
                ) -> list[Column]:  # fmt: skip
    """The demo's columns; `shipped_grid`: N of the shipped LoRA's training grid (its Euler columns)."""
    from lcmkit.families import family_of_pipeline
    from lcmkit.infer.schedulers import teacher_scheduler

    teacher = base
    teacher.scheduler = teacher_scheduler(base.scheduler.config, settings.teacher_sampler)
    # a full student with a w input takes the guidance there; a LoRA (or a full SD3 student) has it baked in
    takes_w = settings.mode == "full" and family_of_pipeline(base).full_student_takes_w
    lcm_guidance = settings.guidance if takes_w else LORA_GUIDANCE_SCALE
    group = f"teacher {'Euler' if settings.flow else 'DPM++'}"
    cols = [Column(f"{group} {n}", group, teacher, n, settings.guidance)
            for n in [settings.teacher_steps, *settings.teacher_few_steps]]  # fmt: skip
    models = [("LCM", lcm, settings.lcm_steps, lcm_guidance, settings.num_ddim_timesteps)]
    if shipped is not None:  # the fully distilled LCM-LoRA that ships, beside this run's
        grid = shipped_grid or settings.num_ddim_timesteps
        models.append(("shipped", shipped, settings.shipped_steps, 1.0, grid))
    for name, pipe, lcm_steps, guidance, grid in models:
        group = "LCM" if name == "LCM" else f"{name} LCM"
        cols += [Column(f"{group} {n}", group, pipe, n, guidance) for n in lcm_steps]
        # the other samplers: TCD (a UNet model), Euler on the training grid (a flow model)
        for sampler, steps in (("tcd", settings.tcd_steps), ("euler", settings.euler_steps)):
            if steps:
                group = f"{name} {SAMPLER_LABELS[sampler]}"
                cols += sampler_columns(group, pipe, sampler, steps, guidance, grid, settings.tcd_gamma)
    return cols


def toy_prompts(n: int, seed: int) -> list[str]:
    """`n` captions of random toy scenes (the demo's and `lcmkit eval --prompts toy`'s evaluation prompts)."""
    return [scene.caption() for scene in sample_scenes(n, seed + 4242)]


def toy_scores(images: list[Image.Image], prompts: list[str], reference: Any = None) -> dict[str, float]:
    """Prompt accuracy (pixel checker) and probe-FD against 2,000 held-out real renders (shipped probe)."""
    from lcmkit.toy.checker import prompt_accuracy

    arrays = [np.asarray(im) for im in images]
    scores = {"prompt_accuracy": prompt_accuracy(arrays, prompts)}
    try:
        from lcmkit.toy.probe import load_probe, probe_fd

        scores["probe_fd"] = probe_fd(arrays, None, probe=load_probe())
    except (ImportError, FileNotFoundError):
        pass
    return scores


def quality_bar(rows: list[dict[str, Any]], steps: int = 4, dpm_steps: int | None = None) -> list[str]:
    """The toy world's quality bar (the LCM paper's claim at small scale), checked on eval/demo rows (dicts with
    label, group, steps, probe_fd, prompt_accuracy): the distilled model at `steps` against the teacher's
    DDIM 50 (probe-FD at most 1.5x, prompt accuracy within 10 points) and DPM-Solver++ at `dpm_steps` (default
    `steps`; lower probe-FD). One line per criterion whose columns are there, PASS or FAIL with the numbers, for
    each distilled sampler (LCM, TCD) in the rows."""

    def find(group: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["group"] == group and r["steps"] == n and "probe_fd" in r), None)

    dpm_steps = steps if dpm_steps is None else dpm_steps
    ddim, dpm = find("teacher DDIM", 50), find("teacher DPM++", dpm_steps)
    students = [r for r in rows if not r["group"].startswith("teacher") and r["steps"] == steps and "probe_fd" in r]

    def line(ok: bool, text: str) -> str:
        return f"{'PASS' if ok else 'FAIL'}  {text}"

    lines = []
    for student in students:
        name, fd, acc = student["label"], student["probe_fd"], student["prompt_accuracy"]
        if ddim is not None:
            lines.append(line(fd <= 1.5 * ddim["probe_fd"],
                              f"{name} probe-FD {fd:.2f} <= 1.5 x teacher DDIM 50's {ddim['probe_fd']:.2f} "
                              f"(= {1.5 * ddim['probe_fd']:.2f})"))  # fmt: skip
        if dpm is not None:
            lines.append(line(fd < dpm["probe_fd"], f"{name} probe-FD {fd:.2f} < teacher DPM++ {dpm_steps}'s "
                              f"{dpm['probe_fd']:.2f}"))  # fmt: skip
        if ddim is not None:
            lines.append(line(acc >= ddim["prompt_accuracy"] - 0.10, f"{name} prompt accuracy {acc:.1%} within 10 "
                              f"points of teacher DDIM 50's {ddim['prompt_accuracy']:.1%}"))  # fmt: skip
    return lines


def swap_in(fresh: Path, final: Path) -> None:
    """Replace `final` by the finished run in `fresh` (renames; the previous run is removed last), and make the new
    run's record and card name the folder it now lives in."""
    from lcmkit.outputs.card import write_model_card
    from lcmkit.outputs.record import RUN_RECORD

    record = json.loads((fresh / RUN_RECORD).read_text())
    record["config"]["train"]["out"] = str(final)
    (fresh / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    fresh.rename(final)
    write_model_card(final)
    if old.exists():
        shutil.rmtree(old)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    teacher = toy_teacher(settings.teacher, settings.flow)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = ensure_shards(out / "data", settings)
    run_dir = out / f"lcm-{settings.mode}"
    # The new run is written beside the previous one and swapped in only when it has finished: an interrupted
    # re-run leaves the previous run as it was (and its own unfinished folder, removed by the next attempt).
    fresh = out / f".lcm-{settings.mode}.new"
    if fresh.exists():
        shutil.rmtree(fresh)
    result = distill(distill_config(settings, teacher, specs["train"], fresh), command="lcmkit demo")
    swap_in(fresh, run_dir)
    t_distill = time.perf_counter() - t0

    base, lcm = load_pipelines(settings, teacher, run_dir)
    shipped_dir, ships = settings.shipped_lora, FLOW_LORA_DIR if settings.flow else LORA_DIR
    if shipped_dir is None and settings.teacher is None and (ships / "pytorch_lora_weights.safetensors").is_file():
        shipped_dir = str(ships)
    shipped = lora_pipeline(teacher, shipped_dir) if shipped_dir and shipped_dir != "none" else None
    shipped_grid = lcm_lora_ddim_timesteps([(shipped_dir, 1.0)]) if shipped is not None else None
    columns = columns_for(settings, base, lcm, shipped, shipped_grid)
    prompts = toy_prompts(settings.n_eval, settings.seed)
    latent = IMAGE_SIZE // base.vae_scale_factor
    noise = initial_noise(len(prompts), (denoiser_of(base).config.in_channels, latent, latent), settings.seed)
    sample_columns(columns, prompts, noise, settings.seed, 50, IMAGE_SIZE, settings.progress)
    for col in columns:
        col.metrics.update(toy_scores(col.images, prompts))

    rows = [[c.images[i] for c in columns] for i in range(settings.grid_rows)]
    image_grid(rows, prompts[: settings.grid_rows], [c.label for c in columns]).save(out / "grid.png")
    info = {"mode": settings.mode, "flow": settings.flow, "distill_steps": result.train.steps, "distill_s": t_distill,
            "shipped_lora": shipped_dir if shipped is not None else None,
            "shipped_lora_steps": shipped_lora_steps(Path(shipped_dir)) if shipped is not None else None,
            "median_s_per_step": result.train.median_s_per_step, "n_eval": settings.n_eval,
            "total_s": time.perf_counter() - t0}  # fmt: skip
    table = write_report(columns, out, info, stem="metrics")
    return {"table": table, "out": str(out), **info}
