"""What a finished run leaves in --out: its weights and its run record (lcmkit_run.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lcmkit.families.models import LCDModels, save_full_lcm, save_lora
from lcmkit.families.teacher import Teacher
from lcmkit.infer.sampling import SamplingFacts
from lcmkit.measure.system import machine, peak_gpu_mb, peak_rss_mb, versions
from lcmkit.train.checkpoint import CHECKPOINT_DIR

RUN_RECORD = "lcmkit_run.json"
OUTPUTS = (RUN_RECORD, "README.md", "pytorch_lora_weights.safetensors", "unet", "unet_online", "transformer",
           "transformer_online", "pipeline", "best", "validation",
           "logs", CHECKPOINT_DIR)  # fmt: skip
"""Everything lcmkit writes into --out (what --overwrite removes, and nothing else)."""


def save_weights(models: LCDModels, teacher: Teacher, out: Path, cfg: Any, unwrap: Any) -> None:
    """LoRA: pytorch_lora_weights.safetensors. Full: the EMA target as `unet/` (`transformer/`) and a ready
    `pipeline/`, with the online student beside it (`unet_online/`)."""
    if cfg.mode == "lora":
        facts = SamplingFacts(cfg.lcd.num_ddim_timesteps, cfg.lcd.w_min, cfg.lcd.w_max)
        save_lora(unwrap(models.student_net), teacher.family, out, cfg.lora, facts.metadata())
        return
    save_full_lcm(models.target_net, teacher, out, cfg.lcd.num_ddim_timesteps)
    unwrap(models.student_net).save_pretrained(out / f"{teacher.family.denoiser}_online")


def write_run_record(out: Path, record: dict[str, Any], t_start: float) -> Path:
    """The run record: what was run (record) plus where, with which versions, how long and how much memory."""
    record = {**record, "versions": versions(), "wall_s": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
              "peak_gpu_mb": peak_gpu_mb(),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine()}  # fmt: skip
    path = out / RUN_RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
