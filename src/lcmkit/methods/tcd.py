"""Trajectory Consistency Distillation (Zheng et al. 2024, arXiv 2402.19159) and Phased Consistency Models (Wang et
al. 2024, arXiv 2405.18407) as method objects beside LCD.

Both replace LCD's map to the origin with a map to an earlier point s of the same trajectory, the trajectory
consistency function f(z_t, t, s): the first-order exponential-integrator step from t to s with the network's own
prediction (a DDIM step for a VP teacher, an Euler step of the velocity for a flow teacher; core/trajectory.py).
f(z, t, t) = z holds by construction, so no boundary scalings are needed. The loss compares
f_theta(z_{t_{n+k}}, t_{n+k}, s) with f_theta-(z_{t_n}, t_n, s), z_{t_n} from the guided teacher's solver step:

- TCD draws s per example uniformly among the grid points at or below t_n (s = 0 is LCD's origin);
- PCM splits the grid into K phases and takes s = the lower edge of the phase of t_{n+k}: the student learns K
  consistent sub-trajectories and samples deterministically in K steps, edge to edge (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from lcmkit.methods.base import Batch, Judged, Nets
from lcmkit.methods.lcd import LCD, LCDSettings


class TCD(LCD):
    """One TCD example batch per call of `loss`; the settings are LCD's (w range, N, distance)."""

    scheduler = "TCDScheduler"
    eta: float | None = 0.3
    """Strategic stochastic sampling's gamma: the TCD paper's default."""
    discriminator_lr: float = 1e-5
    """The PCM authors' value: with LCD's faster one the term lags or collapses on TCD and PCM (docs/methods.md)."""

    def __init__(self, settings: LCDSettings, extra: object = None):
        super().__init__(settings)

    def end_index(self, start: Tensor, generator: torch.Generator | None) -> Tensor:
        """Index of s on the grid for start index i (t_{n+k} = grid[i], t_n = grid[i - 1]): uniform in 0..i-1."""
        u = torch.rand(start.shape, generator=generator, device=start.device)
        return (u * start).long().clamp(max=start - 1)

    def judgement(self, origins: tuple[Tensor, Tensor], ends: tuple[Tensor, Tensor], start: Tensor) -> Judged:
        """What an adversarial term judges, of the (student, target) estimates of the origin and of s: TCD's origin
        estimates (a 1-step sample)."""
        return Judged(*origins)

    def loss(self, nets: Nets, batch: Batch, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        s, ode = self.settings, nets.trajectory
        z0 = batch.z0.float()
        n, device = z0.shape[0], z0.device
        grid = ode.grid(s.num_ddim_timesteps, device)
        start = torch.randint(1, s.num_ddim_timesteps + 1, (n,), generator=generator, device=device)
        end = self.end_index(start, generator)
        t_n_plus_k, t_n, t_s = grid[start], grid[start - 1], grid[end]
        eps = torch.randn(z0.shape, generator=generator, device=device)
        w = s.w_min + (s.w_max - s.w_min) * torch.rand(n, generator=generator, device=device)
        z_n_plus_k = ode.noised(z0, eps, t_n_plus_k)

        # Student: f_theta(z_{n+k}, t_{n+k}, s), its own step from t_{n+k} to s.
        with record_function("lcd/student_forward"):
            out = nets.student(z_n_plus_k, t_n_plus_k, batch.cond, w)
            f_student = ode.solver_step(out.float(), None, z_n_plus_k, t_n_plus_k, t_s, w)
        origin = grid[:1].expand(n)
        student_origin = ode.solver_step(out.float(), None, z_n_plus_k, t_n_plus_k, origin, w)

        with torch.no_grad():
            with record_function("lcd/teacher"):
                out_cond, out_uncond = nets.teacher_outputs(z_n_plus_k, t_n_plus_k, batch, w)
            z_n = ode.solver_step(out_cond, out_uncond, z_n_plus_k, t_n_plus_k, t_n, w)
            # Target: f_theta-(z_n, t_n, s); where t_n = s it is z_n itself.
            with record_function("lcd/target"):
                target = nets.target(z_n, t_n, batch.cond, w).float()
                f_target = ode.solver_step(target, None, z_n, t_n, t_s, w)

            target_origin = ode.solver_step(target, None, z_n, t_n, origin, w)

        self.judged = self.judgement((student_origin, target_origin), (f_student, f_target), start)
        return self.distance(f_student, f_target), {"w_mean": w.mean(), "t_mean": t_n_plus_k.float().mean(),
                                                     "s_mean": t_s.float().mean()}  # fmt: skip


@dataclass
class PCMSettings:
    """The [pcm] section: what PCM adds to LCD's settings."""

    num_phases: int = 4
    """K: the trajectory is split into K phases; the student samples in K deterministic steps (1, 2, 4 or 8)."""


def phase_edges(num_steps: int, num_phases: int) -> Tensor:
    """Grid indices of the K + 1 phase edges, 0 included: N - floor(j N / K) for j < K, the grid points that
    diffusers' TCDScheduler steps through for K inference steps on an N-step grid (original_inference_steps = N)."""
    tops = {num_steps - (j * num_steps) // num_phases for j in range(num_phases)}
    return torch.tensor(sorted({0, *tops}))


class PCM(TCD):
    """Phased consistency: s is the lower edge of the phase that holds t_{n+k}. Its students sample on
    TCDScheduler at gamma 0, exactly K steps: deterministic, edge to edge."""

    eta: float | None = 0.0

    def sampling_steps(self, default: int = 4) -> int:
        return self.phases.num_phases

    def __init__(self, settings: LCDSettings, extra: PCMSettings | None = None):
        super().__init__(settings)
        self.phases = extra or PCMSettings()

    def phase(self, start: Tensor) -> tuple[Tensor, Tensor]:
        """Grid indices (lower edge, upper edge) of the phase of start index i: lower < i <= upper."""
        edges = phase_edges(self.settings.num_ddim_timesteps, self.phases.num_phases).to(start.device)
        below = torch.searchsorted(edges, start, right=False) - 1  # the largest edge strictly below the start index
        return edges[below], edges[below + 1]

    def end_index(self, start: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.phase(start)[0]

    def judgement(self, origins: tuple[Tensor, Tensor], ends: tuple[Tensor, Tensor], start: Tensor) -> Judged:
        """PCM's: the phase-edge estimates, carried on to a time of the phase above the edge."""
        return Judged(*ends, *self.phase(start))
