"""The rectified-flow pieces of core/flow.py against the equations of docs/flow.md, and the whole consistency step
on an analytic model: an exact student (the teacher's own ODE solution) has zero loss."""

from __future__ import annotations

import pytest
import torch

from lcmkit.core.flow import (
    FlowSchedule,
    euler_step,
    flow_boundary_scalings,
    flow_consistency_function,
    flow_noise,
    flow_origin,
    guided_euler_step,
    noised,
    shift_sigmas,
)  # fmt: skip
from lcmkit.core.schedule import append_dims


def test_origin_and_noise_invert_the_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    sigma = append_dims(torch.tensor([0.0, 0.2, 0.7, 1.0]), 4)
    x, v = noised(x0, eps, sigma), eps - x0
    torch.testing.assert_close(flow_origin(v, x, sigma), x0)
    torch.testing.assert_close(flow_noise(v, x, sigma), eps)


def test_euler_is_exact_along_a_straight_path_and_guidance_commutes_with_the_parameterisation():
    g = torch.Generator().manual_seed(1)
    x0, eps, u0 = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    s, s_prev = append_dims(torch.tensor([0.9, 0.5, 0.3]), 4), append_dims(torch.tensor([0.6, 0.4, 0.0]), 4)
    x = noised(x0, eps, s)
    torch.testing.assert_close(euler_step(x, eps - x0, s, s_prev), noised(x0, eps, s_prev))
    # the guided velocity step = one step with guided x0_hat and eps_hat (both affine in v)
    v_c, v_u, w = eps - x0, eps - u0, append_dims(torch.tensor([0.0, 2.0, 6.5]), 4)
    x0_g = flow_origin(v_c, x, s) + w * (flow_origin(v_c, x, s) - flow_origin(v_u, x, s))
    eps_g = flow_noise(v_c, x, s) + w * (flow_noise(v_c, x, s) - flow_noise(v_u, x, s))
    torch.testing.assert_close(guided_euler_step(v_c, v_u, x, s, s_prev, w), noised(x0_g, eps_g, s_prev))


def test_the_sigma_grid_is_the_teachers_shifted_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = shift_sigmas(torch.linspace(1, 1000, 1000).flip(0).double() / 1000, 3.0)
    torch.testing.assert_close(ours.float(), scheduler.sigmas[:1000].float())
    grid = FlowSchedule(shift=3.0).grid(4)
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all())
    assert grid[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # the shift pushes the grid towards noise
    hi, lo = FlowSchedule(3.0).sample_pairs(1000, 4, torch.Generator().manual_seed(0))
    assert set(torch.round(hi, decimals=5).tolist()) == set(torch.round(grid[1:].float(), decimals=5).tolist())
    assert torch.equal(torch.bucketize(lo, grid.float()) + 1, torch.bucketize(hi, grid.float()))  # one step apart


def test_the_boundary_condition_holds_at_sigma_zero():
    c_skip, c_out = flow_boundary_scalings(torch.tensor([0.0, 0.5, 1.0]))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[2] < 1e-6 and c_out[2] > 0.999
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    zero = torch.zeros(2, 1)
    torch.testing.assert_close(flow_consistency_function(v, x, zero), x)  # f = x0_hat = x at sigma 0
    cs, co = (append_dims(s, 2) for s in flow_boundary_scalings(torch.zeros(2)))
    torch.testing.assert_close(flow_consistency_function(v, x, zero, cs, co), x)


def consistency_loss(student, teacher_cond, teacher_uncond, x0, w, num_steps=8, seed=0):
    """One flow consistency step built from core/flow.py alone: skipping pair on the sigma grid, the guided teacher's
    Euler step, f of student and target (the student itself) in latent space, squared distance."""
    g = torch.Generator().manual_seed(seed)
    s, s_prev = (append_dims(t, x0.ndim) for t in FlowSchedule(shift=3.0).sample_pairs(x0.shape[0], num_steps, g))
    x = noised(x0, torch.randn(x0.shape, generator=g), s)
    x_prev = guided_euler_step(teacher_cond(x, s), teacher_uncond(x, s), x, s, s_prev, append_dims(w, x0.ndim))
    f_student = flow_consistency_function(student(x, s), x, s)
    f_target = flow_consistency_function(student(x_prev, s_prev), x_prev, s_prev)
    return ((f_student - f_target) ** 2).mean()


def test_an_exact_student_has_zero_loss_and_a_wrong_one_does_not():
    """Point-mass data: the teacher's velocity toward x0* is v = (x - x0*) / sigma, exactly. Guided, every trajectory
    runs straight to g* = c* + w (c* - u*), so the exact consistency function is f = g*: the student whose x0_hat is
    g* everywhere. Its loss is zero; the unguided teacher as a student is not consistent with the guided ODE."""
    g = torch.Generator().manual_seed(3)
    c_star, u_star = torch.randn(5, 16, 4, 4, generator=g), torch.randn(5, 16, 4, 4, generator=g)
    w = torch.tensor([0.0, 1.0, 2.5, 4.0, 7.0])
    g_star = c_star + append_dims(w, 4) * (c_star - u_star)

    def toward(target):
        return lambda x, s: (x - target) / s

    exact = consistency_loss(toward(g_star), toward(c_star), toward(u_star), c_star, w)
    assert exact.item() < 1e-10
    wrong = consistency_loss(toward(c_star), toward(c_star), toward(u_star), c_star, w)
    assert wrong.item() > 1e-2
