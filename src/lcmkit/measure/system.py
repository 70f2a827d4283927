"""What a measurement runs on: machine, library versions, peak memory; and a markdown table helper."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lcmkit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_gpu_mb() -> float | None:
    """Peak GPU memory allocated by this process (MiB), None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
"""Dense bf16 tensor-core peak of datacenter GPUs (vendor datasheets, SXM parts; TFLOP/s): the denominator of MFU."""


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU from its name, None when unknown (or a CPU)."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if device_name and key in device_name:
            return tflops
    return None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Platform, CPU and GPU, and the versions of the libraries that decide the numbers."""

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                            **versions()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
