"""Validation grids of the student while it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lcmkit.distill.config import DistillConfig
from lcmkit.families.models import LCDModels
from lcmkit.families.teacher import Teacher
from lcmkit.infer.images import image_grid
from lcmkit.infer.pipelines import generate, lcm_pipeline
from lcmkit.infer.sampling import default_guidance_scale


class Validator:
    """Saves a grid of few-step samples of the current student (rows prompts, columns step counts)."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher, models: LCDModels, out: Path, accelerator: Any):
        self.cfg, self.teacher, self.models, self.out, self.accelerator = cfg, teacher, models, out, accelerator

    def __call__(self, step: int) -> Path:
        cfg = self.cfg
        unet = self.models.student_net
        guidance = default_guidance_scale(self.models.mode == "full", self.teacher.family)
        pipe = lcm_pipeline(self.teacher, unet, cfg.lcd.num_ddim_timesteps)
        unet.eval()
        try:
            columns = [
                generate(pipe, cfg.train.validation_prompts, n, guidance, cfg.train.seed, cfg.data.resolution)
                for n in cfg.train.validation_steps
            ]
        finally:
            unet.train()
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
