"""What every distillation method is given, and what it returns.

A method is one object built from its own settings. Its `loss(nets, batch, generator)` returns the loss to
minimise and detached tensors to log. It sees the networks only as callables, so it knows neither the model family
nor whether the student is a full model or a LoRA (the families build `Nets`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lcmkit.core.schedule import NoiseSchedule


class Denoiser(Protocol):
    """A student or target call: (z_t, t, conditioning, w) -> raw denoiser output (eps, v or x0)."""

    def __call__(self, z_t: Tensor, t: Tensor, cond: Any, w: Tensor) -> Tensor: ...


@dataclass
class Nets:
    """The networks of one distillation, as a method sees them."""

    student: Denoiser
    """With gradients: the model being trained."""
    teacher: Callable[[Tensor, Tensor, Any], Tensor]
    """Frozen: (z_t, t, conditioning) -> raw output, no guidance input."""
    target: Denoiser
    """No gradients: the EMA of the student (full) or the student itself (LoRA)."""
    schedule: NoiseSchedule
    prediction_type: str
    """What the teacher's raw output is: epsilon, v_prediction or sample."""


@dataclass
class Batch:
    """One training batch, encoded: clean latents (already scaled) and the two conditionings (anything with
    `.cat(other)`: the family's)."""

    z0: Tensor
    cond: Any
    uncond: Any


class Method(Protocol):
    def loss(
        self, nets: Nets, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]: ...
