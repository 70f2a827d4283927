"""Devices, dtypes and diffusers-version shims shared by training and inference."""

from __future__ import annotations

from typing import Any

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The precision names of every --dtype-like option."""


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """diffusers' loading dtype keyword: `dtype` from 0.40 (where `torch_dtype` warns), `torch_dtype` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype": dtype} if Version(diffusers.__version__).release >= (0, 40) else {"torch_dtype": dtype}


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    return PRECISIONS[dtype]
