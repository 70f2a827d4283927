"""Rectified flow (SD3/SD3.5, FLUX.1): the noise schedule, the velocity parameterisation, the guided Euler solver
step and the consistency function in sigma (docs/flow.md derives each line).

Convention of diffusers' FlowMatchEulerDiscreteScheduler: x_sigma = (1 - sigma) x0 + sigma eps for sigma in [0, 1];
the network predicts the velocity v = eps - x0, and the probability-flow ODE is dx/dsigma = v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lcmkit.core.solver import guided


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift of the noise levels: shift s / (1 + (shift - 1) s) (SD3 paper, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    """The teacher's sigma grid: N skipping steps over its (shifted) noise levels, sigma_N = 1 down to sigma_0 = 0."""

    shift: float = 1.0

    def grid(self, num_steps: int) -> Tensor:
        """sigma_0 = 0 < sigma_1 < ... < sigma_N = 1: the teacher's shifted levels at i / N (float64)."""
        return shift_sigmas(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps, self.shift)

    def sample_pairs(
        self, batch: int, num_steps: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Draw i ~ U{1..N}; return (sigma_i, sigma_(i-1)): one skipping step of the solver grid."""
        grid = self.grid(num_steps).float().to(device)
        i = torch.randint(1, num_steps + 1, (batch,), generator=generator, device=device)
        return grid[i], grid[i - 1]


def noised(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps (sigma broadcastable against x0)."""
    return (1 - sigma) * x0 + sigma * eps


def flow_origin(v: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """x0_hat = x - sigma v: where the straight line through x with velocity v meets sigma = 0."""
    return x - sigma * v


def flow_noise(v: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """eps_hat = x + (1 - sigma) v: where it meets sigma = 1."""
    return x + (1 - sigma) * v


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_prev: Tensor) -> Tensor:
    """One Euler step of dx/dsigma = v from sigma to sigma_prev (< sigma): x + (sigma_prev - sigma) v."""
    return x + (sigma_prev - sigma) * v


def guided_euler_step(
    v_cond: Tensor, v_uncond: Tensor, x: Tensor, sigma: Tensor, sigma_prev: Tensor, w: Tensor
) -> Tensor:
    """The guided teacher's Euler step (classifier-free guidance in the LCM convention, scale w + 1). Guiding the
    velocity equals guiding x0_hat and eps_hat, since both are affine in v at a fixed (x, sigma)."""
    return euler_step(x, guided(v_cond, v_uncond, w), sigma, sigma_prev)


def flow_boundary_scalings(
    sigma: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0, num_train_timesteps: int = 1000
) -> tuple[Tensor, Tensor]:
    """c_skip, c_out of LCM's boundary condition with t = sigma * T (the timestep the flow transformers take):
    c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x whatever the network says."""
    st = timestep_scaling * num_train_timesteps * sigma.double()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def flow_consistency_function(
    v: Tensor, x: Tensor, sigma: Tensor, c_skip: Tensor | None = None, c_out: Tensor | None = None
) -> Tensor:
    """f(x, sigma) = c_skip x + c_out x0_hat, in latent space (the same space for prediction and target).

    Without scalings, f = x0_hat = x - sigma v: the flow parameterisation meets the boundary condition f(x, 0) = x
    by itself. At sigma = 0, f is x by definition, whatever v is (an exact velocity field is singular there)."""
    x0 = torch.where(sigma == 0, x, flow_origin(v.float(), x, sigma))
    if c_skip is None or c_out is None:
        return x0
    return c_skip * x + c_out * x0
