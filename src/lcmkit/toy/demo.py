"""`lcmkit demo`: the main job on the embedded default, offline, on a CPU.

Distils the shipped toy teacher into an LCM-LoRA (or a full LCM) on toy-world shards with
`lcmkit distill`'s own code, then compares, on the same prompts and seeds:
teacher DPM-Solver++ 25 steps with guidance, teacher DPM-Solver++ 4 steps, and the LCM at 1, 2, 4, 8
steps. Writes a grid PNG, a metrics table (markdown + JSON: probe-FD, prompt accuracy, seconds per
image) and a plot of quality against steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import ConfigError, DistillConfig
from ..distill import distill
from ..sample import generate, image_grid
from .world import IMAGE_SIZE, make_splits, sample_scenes

TEACHER_DIR = Path(__file__).parent / "assets" / "teacher"


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    mode: str = "lora"
    teacher: str | None = None
    """Defaults to the shipped toy teacher."""
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-4
    lora_rank: int = 32
    guidance: float = 5.0
    """The teacher's classifier-free guidance scale; LCD learns it (w = guidance - 1)."""
    n_train: int = 20000
    n_test: int = 2000
    n_eval: int = 300
    grid_rows: int = 6
    lcm_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    teacher_steps: int = 25
    seed: int = 0
    overwrite: bool = True
    progress: bool = True

    @classmethod
    def quick(cls, **kw: Any) -> DemoSettings:
        """A smoke-test sized demo (the test suite runs it)."""
        base = dict(steps=20, batch_size=8, n_train=200, n_test=100, n_eval=8, grid_rows=2, lcm_steps=[1, 2, 4])
        return cls(**{**base, **kw})


@dataclass
class Column:
    label: str
    pipe: Any
    steps: int
    guidance: float
    images: list[Image.Image] = field(default_factory=list)
    seconds_per_image: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def teacher_path(settings: DemoSettings) -> str:
    path = Path(settings.teacher) if settings.teacher else TEACHER_DIR
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"toy teacher {path} not found: it ships with lcmkit once trained "
                          "(lcmkit toy train-teacher), or pass --teacher DIR")  # fmt: skip
    return str(path)


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
    w = settings.guidance - 1.0
    # LoRA has no w input: it learns the teacher's ODE at the demo's guidance; a full LCM learns a range.
    cfg.lcd.w_min, cfg.lcd.w_max = (w, w) if settings.mode == "lora" else (max(w - 3.0, 0.0), w + 3.0)
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


def load_pipelines(settings: DemoSettings, teacher: str, run_dir: Path) -> tuple[Any, Any]:
    """(teacher pipeline, distilled pipeline with LCMScheduler)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    if settings.mode == "lora":
        lcm = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
        lcm.scheduler = LCMScheduler.from_config(lcm.scheduler.config)
        lcm.load_lora_weights(str(run_dir))
        lcm.fuse_lora()
    else:
        lcm = LatentConsistencyModelPipeline.from_pretrained(run_dir / "pipeline", torch_dtype=torch.float32)
    lcm.set_progress_bar_config(disable=True)
    return base, lcm


def columns_for(settings: DemoSettings, base: Any, lcm: Any) -> list[Column]:
    from diffusers import DPMSolverMultistepScheduler

    teacher = base
    teacher.scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="dpmsolver++")
    lcm_guidance = 1.0 if settings.mode == "lora" else settings.guidance
    cols = [
        Column(f"teacher DPM++ {settings.teacher_steps}", teacher, settings.teacher_steps, settings.guidance),
        Column("teacher DPM++ 4", teacher, 4, settings.guidance),
    ]
    cols += [Column(f"LCM {n}", lcm, n, lcm_guidance) for n in settings.lcm_steps]
    return cols


def score(columns: list[Column], prompts: list[str]) -> None:
    """Prompt accuracy (pixel checker) and probe-FD against 2,000 held-out real renders (shipped probe)."""
    from .checker import prompt_accuracy

    try:
        from .probe import load_probe, probe_fd

        probe = load_probe()
    except (ImportError, FileNotFoundError):
        probe = None
    for col in columns:
        arrays = [np.asarray(im) for im in col.images]
        col.metrics["prompt_accuracy"] = prompt_accuracy(arrays, prompts)
        if probe is not None:
            col.metrics["probe_fd"] = probe_fd(arrays, None, probe=probe)


def write_table(columns: list[Column], out: Path, info: dict[str, Any]) -> str:
    has_fd = all("probe_fd" in c.metrics for c in columns)
    head = "| sampler | steps | guidance | prompt accuracy |" + (" probe-FD |" if has_fd else "") + " s/image |"
    rule = "|---|---|---|---|" + ("---|" if has_fd else "") + "---|"
    rows = [head, rule]
    for c in columns:
        fd = f" {c.metrics['probe_fd']:.2f} |" if has_fd else ""
        rows.append(f"| {c.label} | {c.steps} | {c.guidance:g} | {c.metrics['prompt_accuracy']:.1%} |{fd}"
                    f" {c.seconds_per_image:.4f} |")  # fmt: skip
    table = "\n".join(rows) + "\n"
    (out / "metrics.md").write_text(table)
    record = {
        "columns": [
            {"label": c.label, "steps": c.steps, "guidance": c.guidance, "seconds_per_image": c.seconds_per_image,
             **c.metrics} for c in columns
        ],
        **info,
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return table


def write_plot(columns: list[Column], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["prompt_accuracy"] + (["probe_fd"] if all("probe_fd" in c.metrics for c in columns) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for group, marker in (("LCM", "o-"), ("teacher", "s--")):
            cols = [c for c in columns if c.label.startswith(group)]
            ax.plot([c.steps for c in cols], [c.metrics[metric] for c in cols], marker, label=group)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("quality against steps (same prompts and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    teacher = teacher_path(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = ensure_shards(out / "data", settings)
    run_dir = out / f"lcm-{settings.mode}"
    result = distill(distill_config(settings, teacher, specs["train"], run_dir), command="lcmkit demo")
    t_distill = time.perf_counter() - t0

    base, lcm = load_pipelines(settings, teacher, run_dir)
    columns = columns_for(settings, base, lcm)
    prompts = [s.caption() for s in sample_scenes(settings.n_eval, settings.seed + 4242)]
    for col in tqdm(columns, desc="sampling", disable=not settings.progress):
        start = time.perf_counter()
        col.images = generate(col.pipe, prompts, col.steps, col.guidance, settings.seed, IMAGE_SIZE, batch_size=50)
        col.seconds_per_image = (time.perf_counter() - start) / len(prompts)
    score(columns, prompts)

    rows = [[c.images[i] for c in columns] for i in range(settings.grid_rows)]
    image_grid(rows, prompts[: settings.grid_rows], [c.label for c in columns]).save(out / "grid.png")
    info = {"mode": settings.mode, "distill_steps": result.train.steps, "distill_s": t_distill,
            "median_s_per_step": result.train.median_s_per_step, "n_eval": settings.n_eval,
            "total_s": time.perf_counter() - t0}  # fmt: skip
    table = write_table(columns, out, info)
    write_plot(columns, out / "quality.png")
    return {"table": table, "out": str(out), **info}
