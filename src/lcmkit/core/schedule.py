"""The teacher's discrete noise schedule and the skipping-step (DDIM) timestep grid (LCM paper, section 4.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that a per-example scalar broadcasts over a latent."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


@dataclass(frozen=True)
class NoiseSchedule:
    """The teacher's discrete VP schedule: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    alphas_cumprod: Tensor

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()


def transition(z_s: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """The forward process from a sample at time s to a later time t: z_t = a z_s + b eps with a = alpha_t / alpha_s
    and b^2 = sigma_t^2 - a^2 sigma_s^2, so that z_s = alpha_s x0 + sigma_s e carried on has the marginal of
    alpha_t x0 + sigma_t e (any schedule z = alpha x0 + sigma e: VP or rectified flow)."""
    a = alpha_t / alpha_s
    return a * z_s + (sigma_t**2 - (a * sigma_s) ** 2).clamp(min=0).sqrt() * eps


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> Tensor:
    """The skipping-step solver grid tau_i = (i + 1) * k - 1, i = 0..N-1, with k = T // N."""
    k = num_train_timesteps // num_ddim_timesteps
    return (torch.arange(num_ddim_timesteps) + 1) * k - 1


def sample_timestep_pairs(
    batch: int,
    num_train_timesteps: int,
    num_ddim_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Draw i ~ U{0..N-1}; return (t_n_plus_k = tau_i, t_n = max(tau_i - k, 0))."""
    k = num_train_timesteps // num_ddim_timesteps
    grid = ddim_timesteps(num_train_timesteps, num_ddim_timesteps).to(device)
    index = torch.randint(0, num_ddim_timesteps, (batch,), generator=generator, device=device)
    t_n_plus_k = grid[index]
    return t_n_plus_k, (t_n_plus_k - k).clamp(min=0)
