"""Latent Consistency Distillation (Luo et al. 2023, Algorithm 1) as one method object.

Notation follows the LCM paper: a skipping step k over a DDIM grid, t_n_plus_k -> t_n, guidance scale w,
boundary scalings c_skip / c_out, consistency function f. The loss does not know whether the student is a full
LCM or an LCM-LoRA, nor which family the teacher is: both are hidden behind the `student`, `teacher` and `target`
callables and the conditioning object (anything with `.cat(other)`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.profiler import record_function

from lcmkit.core.consistency import boundary_scalings, pseudo_huber
from lcmkit.core.prediction import predicted_noise, predicted_origin
from lcmkit.core.schedule import NoiseSchedule, append_dims, sample_timestep_pairs
from lcmkit.core.solver import ddim_step


class UNetFn(Protocol):
    """A denoiser call: (z_t, t, conditioning, w) -> raw UNet output (eps, v or x0)."""

    def __call__(self, z_t: Tensor, t: Tensor, cond: Any, w: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LCDSettings:
    """The method's hyperparameters (DESIGN.md section 1), reference defaults."""

    prediction_type: str = "epsilon"
    num_ddim_timesteps: int = 50
    w_min: float = 3.0
    w_max: float = 15.0
    loss: str = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5


def consistency_function(
    model_output: Tensor, z_t: Tensor, t: Tensor, schedule: NoiseSchedule, settings: LCDSettings
) -> Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t), in float32."""
    alpha, sigma = (append_dims(s, z_t.ndim) for s in schedule.alpha_sigma(t))
    c_skip, c_out = (
        append_dims(s, z_t.ndim) for s in boundary_scalings(t, settings.sigma_data, settings.timestep_scaling)
    )
    x0_hat = predicted_origin(model_output.float(), z_t, alpha, sigma, settings.prediction_type)
    return c_skip * z_t + c_out * x0_hat


def lcd_loss(
    z0: Tensor,
    cond: Any,
    uncond: Any,
    student: UNetFn,
    teacher: Callable[[Tensor, Tensor, Any], Tensor],
    target: UNetFn,
    schedule: NoiseSchedule,
    settings: LCDSettings,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One LCD example batch, Algorithm 1 of the LCM paper. z0 are clean latents (already scaled)."""
    z0 = z0.float()
    batch, device = z0.shape[0], z0.device
    nd = z0.ndim

    # Skipping-step pair (t_n_plus_k, t_n) on the DDIM grid, noise, and a guidance scale per example.
    t_n_plus_k, t_n = sample_timestep_pairs(
        batch, schedule.num_train_timesteps, settings.num_ddim_timesteps, generator, device
    )
    eps = torch.randn(z0.shape, generator=generator, device=device)
    w = settings.w_min + (settings.w_max - settings.w_min) * torch.rand(batch, generator=generator, device=device)
    alpha_nk, sigma_nk = (append_dims(s, nd) for s in schedule.alpha_sigma(t_n_plus_k))
    alpha_n, sigma_n = (append_dims(s, nd) for s in schedule.alpha_sigma(t_n))
    z_n_plus_k = alpha_nk * z0 + sigma_nk * eps

    # Student: f_theta(z_{n+k}, t_{n+k}, c, w), with gradients.
    with record_function("lcd/student_forward"):
        f_student = consistency_function(
            student(z_n_plus_k, t_n_plus_k, cond, w), z_n_plus_k, t_n_plus_k, schedule, settings
        )

    with torch.no_grad():
        # Teacher: ONE forward over [cond; uncond], then guided x0 and eps, then one DDIM step to t_n.
        with record_function("lcd/teacher"):
            out = teacher(torch.cat([z_n_plus_k, z_n_plus_k]), torch.cat([t_n_plus_k, t_n_plus_k]), cond.cat(uncond))
        out_cond, out_uncond = out.float().chunk(2)
        pt = settings.prediction_type
        x0_c = predicted_origin(out_cond, z_n_plus_k, alpha_nk, sigma_nk, pt)
        x0_u = predicted_origin(out_uncond, z_n_plus_k, alpha_nk, sigma_nk, pt)
        eps_c = predicted_noise(out_cond, z_n_plus_k, alpha_nk, sigma_nk, pt)
        eps_u = predicted_noise(out_uncond, z_n_plus_k, alpha_nk, sigma_nk, pt)
        w_ = append_dims(w, nd)
        x0_guided = x0_c + w_ * (x0_c - x0_u)  # LCM convention: classifier-free scale w + 1
        eps_guided = eps_c + w_ * (eps_c - eps_u)
        z_n = ddim_step(x0_guided, eps_guided, alpha_n, sigma_n)

        # Target: f_theta-(z_n, t_n, c, w) (EMA for full LCD, the student itself for LoRA).
        with record_function("lcd/target"):
            f_target = consistency_function(target(z_n, t_n, cond, w), z_n, t_n, schedule, settings)

    if settings.loss == "l2":
        loss = torch.nn.functional.mse_loss(f_student, f_target)
    else:
        loss = pseudo_huber(f_student, f_target, settings.huber_c).mean()
    # Detached tensors: the trainer converts them only on logging steps (no device sync every step).
    return loss, {"w_mean": w.mean(), "t_mean": t_n_plus_k.float().mean()}
