"""Latent Consistency Distillation (Luo et al. 2023, Algorithm 1) as one method object.

Notation follows the LCM paper: a skipping step k over the teacher's solver grid (DDIM timesteps, or a flow
teacher's sigmas: core/trajectory.py), t_n_plus_k -> t_n, guidance scale w,
boundary scalings c_skip / c_out, consistency function f. The loss does not know whether the student is a full
LCM or an LCM-LoRA, nor which family the teacher is: both are hidden behind `Nets` and the conditioning object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from lcmkit.core.consistency import pseudo_huber
from lcmkit.methods.base import Batch, Judged, Nets


@dataclass
class LCDSettings:
    """LCD's hyperparameters (DESIGN.md section 1), shared by every consistency method (the [lcd] section); the
    defaults are the reference scripts', the w range the family's."""

    w_min: float | None = None
    """Lowest guidance scale w sampled per sample (the student learns the whole range); default: the family's
    (SD/SDXL 3, the reference scripts'; SD3 2.5; FLUX.1-dev 1.5)."""
    w_max: float | None = None
    """Highest guidance scale w sampled per sample; default: the family's (SD/SDXL 15; SD3 6; FLUX.1-dev 4)."""
    num_ddim_timesteps: int = 50
    """N, the teacher's solver grid: DDIM timesteps k = 1000 / N apart, or N steps of a flow teacher's sigmas."""
    loss: str = "huber"
    """Consistency distance: huber (pseudo-Huber, the LCM-LoRA paper) or l2."""
    huber_c: float = 0.001
    """c of the pseudo-Huber loss sqrt(d^2 + c^2) - c."""
    timestep_scaling: float = 10.0
    """Scales t in the boundary condition c_skip/c_out (the diffusers examples use 10)."""
    sigma_data: float = 0.5
    """sigma_data of the boundary condition c_skip/c_out."""


class LCD:
    """One LCD example batch per call of `loss`, Algorithm 1 of the LCM paper."""

    scheduler = "LCMScheduler"
    """The diffusers scheduler a UNet student of this method samples with."""
    eta: float | None = None
    """Its eta (TCDScheduler's gamma), if it takes one."""
    discriminator_lr: float = 1e-4
    """The adversarial term's discriminator learning rate unless --discriminator-lr says otherwise (measured on the
    toy world: docs/methods.md)."""

    def sampling_steps(self, default: int = 4) -> int:
        """The step count its students sample with by default."""
        return default

    def __init__(self, settings: LCDSettings, extra: object = None):
        self.settings = settings
        self.judged: Judged | None = None
        """Set by each `loss`: what an adversarial term judges."""

    def f(self, nets: Nets, model_output: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """The consistency function f(z_t, t) of a raw network output (LCM paper eq. 9)."""
        return nets.trajectory.consistency(model_output, z_t, t, self.settings.sigma_data,
                                           self.settings.timestep_scaling)  # fmt: skip

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.settings.loss == "l2":
            return torch.nn.functional.mse_loss(pred, target)
        return pseudo_huber(pred, target, self.settings.huber_c).mean()

    def loss(self, nets: Nets, batch: Batch, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        s, ode = self.settings, nets.trajectory
        z0 = batch.z0.float()
        n, device = z0.shape[0], z0.device

        # Skipping-step pair (t_n_plus_k, t_n) on the solver grid, noise, and a guidance scale w per example.
        t_n_plus_k, t_n = ode.sample_pairs(n, s.num_ddim_timesteps, generator, device)
        eps = torch.randn(z0.shape, generator=generator, device=device)
        w = s.w_min + (s.w_max - s.w_min) * torch.rand(n, generator=generator, device=device)
        z_n_plus_k = ode.noised(z0, eps, t_n_plus_k)

        # Student: f_theta(z_{n+k}, t_{n+k}, c, w), with gradients.
        with record_function("lcd/student_forward"):
            f_student = self.f(nets, nets.student(z_n_plus_k, t_n_plus_k, batch.cond, w), z_n_plus_k, t_n_plus_k)

        with torch.no_grad():
            # Teacher: one batched forward over [cond; uncond], then one guided solver step from t_{n+k} to t_n.
            with record_function("lcd/teacher"):
                out_cond, out_uncond = nets.teacher_outputs(z_n_plus_k, t_n_plus_k, batch, w)
            z_n = ode.solver_step(out_cond, out_uncond, z_n_plus_k, t_n_plus_k, t_n, w)

            # Target: f_theta-(z_n, t_n, c, w) (the EMA student for full LCD, the student itself for LoRA).
            with record_function("lcd/target"):
                f_target = self.f(nets, nets.target(z_n, t_n, batch.cond, w), z_n, t_n)

        self.judged = Judged(f_student, f_target)  # one-step samples: the student's (with gradients), the target's
        # Detached tensors: the trainer converts them only on logging steps (no device sync every step).
        return self.distance(f_student, f_target), {"w_mean": w.mean(), "t_mean": t_n_plus_k.float().mean()}
