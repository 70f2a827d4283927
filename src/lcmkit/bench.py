"""`lcmkit bench distill`: distillation throughput and peak memory, each configuration in its own process
(so that peak RSS belongs to that configuration alone), side by side in one run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import ConfigError


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_distill(
    teacher: str, data: str, modes: list[str], steps: int, batch_size: int, resolution: int, lora_rank: int,
    extra: list[str] | None = None, teacher_config: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run `lcmkit distill` once per mode in a subprocess; the first step (warm-up) is excluded from medians."""
    if steps < 3:
        raise ConfigError(f"--steps {steps}: use at least 3 (the first step is warm-up)")
    rows = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"lcmkit-bench-{mode}-") as tmp:
            cmd = [sys.executable, "-m", "lcmkit", "distill", "--teacher", teacher, "--data", data, "--out", tmp,
                   "--overwrite", "--mode", mode, "--max-steps", str(steps), "--batch-size", str(batch_size),
                   "--resolution", str(resolution), "--lora-rank", str(lora_rank), "--checkpoint-every", "0",
                   "--no-progress", *(extra or [])]  # fmt: skip
            if teacher_config:
                cmd += ["--teacher-config", teacher_config]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ConfigError(f"bench: the {mode} run failed: {last}")
            record = json.loads((Path(tmp) / "lcmkit_run.json").read_text())
        rows.append({
            "mode": mode, "steps": steps, "batch_size": batch_size, "resolution": resolution,
            "median_s_per_step": record["median_s_per_step"], "samples_per_s": record["samples_per_s"],
            "peak_rss_mb": record["peak_rss_mb"], "wall_s": time.perf_counter() - start,
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | batch | resolution | median s/step | samples/s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['resolution']} | {r['median_s_per_step']:.3f} "
                     f"| {r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
