"""ODE solver steps of the teacher's probability-flow ODE."""

from __future__ import annotations

from torch import Tensor


def ddim_step(x0_hat: Tensor, eps_hat: Tensor, alpha_prev: Tensor, sigma_prev: Tensor) -> Tensor:
    """Deterministic DDIM update to the earlier timestep: z_prev = alpha_prev x0 + sigma_prev eps."""
    return alpha_prev * x0_hat + sigma_prev * eps_hat
