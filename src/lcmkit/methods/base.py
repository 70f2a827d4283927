"""What every distillation method is given, and what it returns.

A method is one object built from its own settings. Its `loss(nets, batch, generator)` returns the loss to
minimise and detached tensors to log. It sees the networks only as callables, so it knows neither the model family
nor whether the student is a full model or a LoRA (the families build `Nets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lcmkit.core.trajectory import Trajectory


class Denoiser(Protocol):
    """A network call: (z_t, t, conditioning, w) -> raw output (eps, v or x0; a flow model's velocity). A network
    without a guidance input ignores w."""

    def __call__(self, z_t: Tensor, t: Tensor, cond: Any, w: Tensor) -> Tensor: ...


@dataclass
class Nets:
    """The networks of one distillation, as a method sees them."""

    student: Denoiser
    """With gradients: the model being trained."""
    teacher: Denoiser
    """Frozen. Its w is used only by a guidance-distilled teacher (FLUX.1-dev); others are guided by an
    unconditional pass (see teacher_outputs)."""
    target: Denoiser
    """No gradients: the EMA of the student (full) or the student itself (LoRA)."""
    trajectory: Trajectory
    """The teacher's ODE: a VP diffusion's DDIM grid or a rectified flow's sigma grid (core/trajectory.py)."""
    guidance_distilled: bool = False
    """The teacher takes w itself (one pass, no unconditional branch)."""

    def teacher_outputs(self, z_t: Tensor, t: Tensor, batch: Batch, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """(conditional, unconditional) teacher outputs in float32, from ONE batched forward over [cond; uncond];
        a guidance-distilled teacher gives its guided output and None."""
        if self.guidance_distilled:
            return self.teacher(z_t, t, batch.cond, w).float(), None
        z2, t2, w2 = torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([w, w])
        out_cond, out_uncond = self.teacher(z2, t2, batch.cond.cat(batch.uncond), w2).float().chunk(2)
        return out_cond, out_uncond


@dataclass
class Batch:
    """One training batch, encoded: clean latents (already scaled) and the two conditionings (anything with
    `.cat(other)`: the family's)."""

    z0: Tensor
    cond: Any
    uncond: Any


@dataclass
class Judged:
    """What an adversarial term judges after a method's loss: the student's sample `fake` (with gradients) and the
    target's estimate of the same point (detached). `lo` None: both are origin estimates, noised at any grid time;
    else they are at grid index `lo` and are carried on to a grid time in [lo, hi)."""

    fake: Tensor
    target: Tensor
    lo: Tensor | None = None
    hi: Tensor | None = None


class Method(Protocol):
    def loss(
        self, nets: Nets, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]: ...
