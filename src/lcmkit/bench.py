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


def _run_lcmkit(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "lcmkit", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"bench: the {what} run failed: {last}")


def bench_distill(
    teacher: str, data: str, modes: list[str], steps: int, batch_size: int, resolution: int, lora_rank: int,
    extra: list[str] | None = None, teacher_config: str | None = None, cache: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run `lcmkit distill` once per mode (and per data kind: raw, and from an lcmkit cache of the same data when
    `cache`) in a subprocess; the first step (warm-up) is excluded from medians."""
    if steps < 3:
        raise ConfigError(f"--steps {steps}: use at least 3 (the first step is warm-up)")
    rows = []
    model_args = ["--teacher", teacher] + (["--teacher-config", teacher_config] if teacher_config else [])
    with tempfile.TemporaryDirectory(prefix="lcmkit-bench-cache-") as cache_dir:
        sources = [("raw", data)]
        cache_s = None
        if cache:
            start = time.perf_counter()
            _run_lcmkit(["cache", *model_args, "--data", data, "--out", cache_dir, "--overwrite",
                         "--resolution", str(resolution), "--no-progress"], "cache")  # fmt: skip
            cache_s = time.perf_counter() - start
            sources.append(("cache", f"cache:{cache_dir}"))
        for mode in modes:
            for kind, spec in sources:
                with tempfile.TemporaryDirectory(prefix=f"lcmkit-bench-{mode}-") as tmp:
                    start = time.perf_counter()
                    _run_lcmkit(["distill", *model_args, "--data", spec, "--out", tmp, "--overwrite", "--mode", mode,
                                 "--max-steps", str(steps), "--batch-size", str(batch_size),
                                 "--resolution", str(resolution), "--lora-rank", str(lora_rank),
                                 "--checkpoint-every", "0", "--no-progress", *(extra or [])], mode)  # fmt: skip
                    record = json.loads((Path(tmp) / "lcmkit_run.json").read_text())
                rows.append({
                    "mode": mode, "data": kind, "steps": steps, "batch_size": batch_size, "resolution": resolution,
                    "median_s_per_step": record["median_s_per_step"], "samples_per_s": record["samples_per_s"],
                    "peak_rss_mb": record["peak_rss_mb"], "wall_s": time.perf_counter() - start,
                    **({"cache_build_s": cache_s} if kind == "cache" else {}),
                })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | data | batch | resolution | median s/step | samples/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['mode']} | {r.get('data', 'raw')} | {r['batch_size']} | {r['resolution']} "
                     f"| {r['median_s_per_step']:.3f} "
                     f"| {r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
