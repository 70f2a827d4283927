"""The teacher's ODE as a method sees it: where a skipping step starts and ends, how clean latents are noised, one
(guided) solver step, and the consistency function. Two implementations with one interface:

- `DiffusionTrajectory`: a VP diffusion (SD 1.x/2.x, SDXL): integer timesteps on the DDIM grid, DDIM steps,
  LCM's parameterisation of eps / v / x0 outputs (core/schedule.py, core/solver.py, core/consistency.py).
- `FlowTrajectory`: rectified flow (SD3/SD3.5, FLUX.1): sigmas on the teacher's shifted grid, Euler steps of the
  velocity, f in sigma (core/flow.py, docs/flow.md).

A method written against this interface trains either kind of teacher unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lcmkit.core.consistency import consistency_function
from lcmkit.core.flow import (
    FlowSchedule,
    euler_step,
    flow_boundary_scalings,
    flow_consistency_function,
    guided_euler_step,
    noised,
)
from lcmkit.core.prediction import predicted_noise, predicted_origin
from lcmkit.core.schedule import NoiseSchedule, append_dims, ddim_timesteps, sample_timestep_pairs, transition
from lcmkit.core.solver import ddim_step, guided_ddim_step


class Trajectory(Protocol):
    def grid(self, num_steps: int, device: torch.device | str = "cpu") -> Tensor:
        """The N + 1 times of an N-step solver grid, from the clean end (index 0) to pure noise (index N)."""
        ...

    def sample_pairs(
        self, batch: int, num_steps: int, generator: torch.Generator | None, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        """(t_n_plus_k, t_n): one skipping step of an N-step solver grid per example."""
        ...

    def noised(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...

    def travelled(self, z_s: Tensor, eps: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """A sample at time s carried on by the forward process to a time t >= s (same marginal as noising x0)."""
        ...

    def solver_step(
        self, out: Tensor, out_uncond: Tensor | None, z: Tensor, t: Tensor, t_prev: Tensor, w: Tensor
    ) -> Tensor:
        """One step of the teacher's ODE from t to t_prev; guided with w when `out_uncond` is given (else `out`
        already is the guided output of a guidance-distilled teacher)."""
        ...

    def consistency(self, out: Tensor, z: Tensor, t: Tensor, sigma_data: float, timestep_scaling: float) -> Tensor:
        """f(z, t) of a raw network output, in latent space, float32."""
        ...


@dataclass(frozen=True)
class DiffusionTrajectory:
    schedule: NoiseSchedule
    prediction_type: str
    """What the network outputs: epsilon, v_prediction or sample."""

    def grid(self, num_steps: int, device: torch.device | str = "cpu") -> Tensor:
        """0, then the DDIM timesteps tau_i = (i + 1) k - 1: index i + 1 holds tau_i, and index i is where LCD's
        skipping step from tau_i lands (max(tau_i - k, 0))."""
        taus = ddim_timesteps(self.schedule.num_train_timesteps, num_steps)
        return torch.cat([torch.zeros(1, dtype=taus.dtype), taus]).to(device)

    def sample_pairs(
        self, batch: int, num_steps: int, generator: torch.Generator | None, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        return sample_timestep_pairs(batch, self.schedule.num_train_timesteps, num_steps, generator, device)

    def _alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return append_dims(alpha, ndim), append_dims(sigma, ndim)

    def noised(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self._alpha_sigma(t, z0.ndim)
        return alpha * z0 + sigma * eps

    def travelled(self, z_s: Tensor, eps: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return transition(z_s, eps, *self._alpha_sigma(s, z_s.ndim), *self._alpha_sigma(t, z_s.ndim))

    def solver_step(
        self, out: Tensor, out_uncond: Tensor | None, z: Tensor, t: Tensor, t_prev: Tensor, w: Tensor
    ) -> Tensor:
        alpha, sigma = self._alpha_sigma(t, z.ndim)
        alpha_prev, sigma_prev = self._alpha_sigma(t_prev, z.ndim)
        if out_uncond is None:
            x0 = predicted_origin(out, z, alpha, sigma, self.prediction_type)
            eps = predicted_noise(out, z, alpha, sigma, self.prediction_type)
            return ddim_step(x0, eps, alpha_prev, sigma_prev)
        return guided_ddim_step(out, out_uncond, z, alpha, sigma, alpha_prev, sigma_prev, append_dims(w, z.ndim),
                                self.prediction_type)  # fmt: skip

    def consistency(self, out: Tensor, z: Tensor, t: Tensor, sigma_data: float, timestep_scaling: float) -> Tensor:
        return consistency_function(out, z, t, self.schedule, self.prediction_type, sigma_data, timestep_scaling)


@dataclass(frozen=True)
class FlowTrajectory:
    """Times are sigmas in [0, 1]; the network outputs the velocity v = eps - x0."""

    schedule: FlowSchedule

    def grid(self, num_steps: int, device: torch.device | str = "cpu") -> Tensor:
        return self.schedule.grid(num_steps).float().to(device)

    def sample_pairs(
        self, batch: int, num_steps: int, generator: torch.Generator | None, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        return self.schedule.sample_pairs(batch, num_steps, generator, device)

    def noised(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return noised(z0, eps, append_dims(t, z0.ndim))

    def travelled(self, z_s: Tensor, eps: Tensor, s: Tensor, t: Tensor) -> Tensor:
        sigma_s, sigma_t = append_dims(s, z_s.ndim), append_dims(t, z_s.ndim)
        return transition(z_s, eps, 1 - sigma_s, sigma_s, 1 - sigma_t, sigma_t)

    def solver_step(
        self, out: Tensor, out_uncond: Tensor | None, z: Tensor, t: Tensor, t_prev: Tensor, w: Tensor
    ) -> Tensor:
        sigma, sigma_prev = append_dims(t, z.ndim), append_dims(t_prev, z.ndim)
        if out_uncond is None:
            return euler_step(z, out, sigma, sigma_prev)
        return guided_euler_step(out, out_uncond, z, sigma, sigma_prev, append_dims(w, z.ndim))

    def consistency(self, out: Tensor, z: Tensor, t: Tensor, sigma_data: float, timestep_scaling: float) -> Tensor:
        sigma = append_dims(t, z.ndim)
        c_skip, c_out = flow_boundary_scalings(sigma, sigma_data, timestep_scaling)
        return flow_consistency_function(out, z, sigma, c_skip, c_out)
