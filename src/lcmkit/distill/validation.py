"""Validation grids of the student while it trains, and its quality watched against the teacher (--watch-quality):
users see LCM quality fall as training goes on, so the best-scoring weights are kept beside the last."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcmkit.distill.config import DistillConfig
from lcmkit.families.models import LCDModels
from lcmkit.families.teacher import Teacher
from lcmkit.infer.images import image_grid
from lcmkit.infer.pipelines import generate, lcm_pipeline, run_batched
from lcmkit.infer.sampling import SamplingFacts, default_guidance_scale, grid_sigmas
from lcmkit.measure.eval import agreement

BEST = "best"
"""The folder of the best-scoring weights under --out (--watch-quality)."""


class Validator:
    """Saves a grid of few-step samples of the current student (rows prompts, columns step counts); with
    --watch-quality also scores them against the teacher and keeps the best weights."""

    def __init__(
        self, cfg: DistillConfig, teacher: Teacher, models: LCDModels, out: Path, accelerator: Any,
        scorers: list[Any] | None = None,
    ):  # fmt: skip
        self.cfg, self.teacher, self.models, self.out, self.accelerator = cfg, teacher, models, out, accelerator
        self.scorers = [agreement, *(scorers or [])]
        self.reference: list[Any] | None = None
        best = out / BEST / "best.json"  # a resumed run continues to compare with the best of its earlier part
        self.best: dict[str, Any] | None = json.loads(best.read_text()) if cfg.train.resume and best.is_file() else None

    def __call__(self, step: int) -> Path:
        cfg = self.cfg
        unet = self.models.student_net
        guidance = default_guidance_scale(self.models.mode == "full", self.teacher.family)
        pipe = lcm_pipeline(self.teacher, unet, cfg.lcd.num_ddim_timesteps)
        options = self.method_sampler(pipe)
        unet.eval()
        try:
            columns = [
                run_batched(pipe, cfg.train.validation_prompts, cfg.train.seed, 16, num_inference_steps=n,
                            guidance_scale=guidance, height=cfg.data.resolution, width=cfg.data.resolution,
                            **options(n))
                for n in cfg.train.validation_steps
            ]  # fmt: skip
        finally:
            unet.train()
        if cfg.train.watch_quality:
            self.watch(step, columns)
        rows = [list(r) for r in zip(*columns)]
        grid = image_grid(
            rows, cfg.train.validation_prompts, [f"{n} step{'s' * (n > 1)}" for n in cfg.train.validation_steps]
        )
        folder = self.out / "validation"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        grid.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        return path

    def method_sampler(self, pipe: Any) -> Callable[[int], dict[str, Any]]:
        """A student of TCD or PCM is drawn (and scored) on its own sampler: a UNet one on TCDScheduler at the
        method's eta; a flow one (diffusers has no flow TCD scheduler) with deterministic Euler steps on its training
        grid, a PCM student's phase edges. Returns the pipeline arguments for n steps."""
        from diffusers import FlowMatchEulerDiscreteScheduler, TCDScheduler

        from lcmkit.methods import METHODS

        method, grid = METHODS[self.cfg.method], self.cfg.lcd.num_ddim_timesteps
        if method.scheduler != "TCDScheduler":
            return lambda n: {}
        if self.teacher.family.flow:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            return lambda n: {"sigmas": grid_sigmas(n, grid)}
        pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
        return lambda n: {"eta": method.eta}

    def reference_images(self) -> list[Any]:
        """The teacher's images of the validation prompts and seeds: its deterministic sampler (DDIM, a flow
        teacher's Euler) at 50 steps with its family's guidance; drawn once."""
        if self.reference is None:
            from lcmkit.infer.pipelines import teacher_pipeline
            from lcmkit.infer.schedulers import reference_sampler, teacher_scheduler

            config = self.teacher.scheduler.config
            pipe = teacher_pipeline(self.teacher, self.models.teacher_net,
                                    teacher_scheduler(config, reference_sampler(config)))  # fmt: skip
            cfg = self.cfg
            self.reference = generate(pipe, cfg.train.validation_prompts, 50, self.teacher.family.teacher_guidance,
                                      cfg.train.seed, cfg.data.resolution)  # fmt: skip
        return self.reference

    def watch(self, step: int, columns: list[list[Any]]) -> dict[str, float]:
        """Score each step count against the teacher (mean PSNR, 1 - MS-SSIM), log it (tracker and
        logs/quality.jsonl), and save the weights to best/ when the mean PSNR over the step counts is the best yet."""

        reference, prompts = self.reference_images(), self.cfg.train.validation_prompts
        scores: dict[str, float] = {}
        for n, images in zip(self.cfg.train.validation_steps, columns):
            for scorer in self.scorers:
                for name, value in scorer(images, prompts, reference).items():
                    scores[f"quality/{name}_{n}"] = value
        psnrs = [v for k, v in scores.items() if k.startswith("quality/psnr_")]
        scores["quality/psnr_mean"] = sum(psnrs) / len(psnrs)
        self.accelerator.log(scores, step=step)
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "quality.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        if self.best is None or scores["quality/psnr_mean"] > self.best["psnr_mean"]:
            self.best = {"step": step, "psnr_mean": scores["quality/psnr_mean"], "scores": scores,
                         "metric": "mean PSNR (dB) at steps "
                                   f"{','.join(map(str, self.cfg.train.validation_steps))} against the teacher's "
                                   "50-step images of the validation prompts and seeds"}  # fmt: skip
            self.save_best()
        return scores

    def save_best(self) -> None:
        """best/: the LoRA (or the full online student) of the best-scoring step, with best.json."""

        from lcmkit.families.models import save_lora

        folder = self.out / BEST
        folder.mkdir(exist_ok=True)
        models = self.models
        if models.mode == "lora":
            lcd = self.cfg.lcd
            facts = SamplingFacts(lcd.num_ddim_timesteps, lcd.w_min, lcd.w_max)
            save_lora(self.accelerator.unwrap_model(models.student_net), self.teacher.family, folder, self.cfg.lora,
                      facts.metadata())  # fmt: skip
        else:  # the online student: the one the grid and the score were drawn from
            self.accelerator.unwrap_model(models.student_net).save_pretrained(folder / self.teacher.family.denoiser)
        (folder / "best.json").write_text(json.dumps(self.best, indent=2) + "\n")
