"""The LCD math against values computed independently here (not by calling the same functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lcmkit.core.consistency import boundary_scalings, consistency_function, guidance_scale_embedding, pseudo_huber
from lcmkit.core.prediction import predicted_noise, predicted_origin
from lcmkit.core.schedule import NoiseSchedule, ddim_timesteps, sample_timestep_pairs
from lcmkit.core.solver import ddim_step
from lcmkit.core.trajectory import DiffusionTrajectory
from lcmkit.families.conditioning import Conditioning
from lcmkit.methods.base import Batch, Nets
from lcmkit.methods.lcd import LCD, LCDSettings


def sd_schedule() -> NoiseSchedule:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's scaled_linear
    return NoiseSchedule(torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))


def test_ddim_grid_is_skipping_steps_of_k():
    assert ddim_timesteps(1000, 50).tolist() == [19 + 20 * i for i in range(50)]
    assert ddim_timesteps(1000, 4).tolist() == [249, 499, 749, 999]


def test_timestep_pairs_are_k_apart_on_the_grid():
    g = torch.Generator().manual_seed(0)
    t_nk, t_n = sample_timestep_pairs(4096, 1000, 50, g)
    assert set(t_nk.tolist()) <= {19 + 20 * i for i in range(50)}
    assert len(set(t_nk.tolist())) == 50  # every grid point is drawn
    expected = [max(t - 20, 0) for t in t_nk.tolist()]
    assert t_n.tolist() == expected


def test_boundary_scalings_match_formula():
    t = torch.tensor([0, 1, 19, 999])
    c_skip, c_out = boundary_scalings(t, sigma_data=0.5, timestep_scaling=10.0)
    for i, ti in enumerate([0, 1, 19, 999]):
        st = 10.0 * ti
        assert c_skip[i].item() == pytest.approx(0.25 / (st * st + 0.25), rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(st / math.sqrt(st * st + 0.25), rel=1e-6)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_origin_and_noise_conversions_are_exact(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    abar = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64).view(3, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z = alpha * x0 + sigma * eps
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(predicted_origin(output, z, alpha, sigma, prediction_type), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(predicted_noise(output, z, alpha, sigma, prediction_type), eps, rtol=0, atol=1e-10)


def test_guidance_embedding_equals_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 2.5, 7.0, 14.0])
    ours = guidance_scale_embedding(w, 256)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(ours, theirs)
    # and an element by hand: sin(1000 w * 10000^(-j / (half - 1)))
    j = 5
    assert ours[1, j].item() == pytest.approx(math.sin(2500.0 * 10000 ** (-j / 127)), abs=1e-3)
    assert ours[1, 128 + j].item() == pytest.approx(math.cos(2500.0 * 10000 ** (-j / 127)), abs=1e-3)


def test_ddim_step_matches_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, clip_sample=False
    )
    sched.set_timesteps(50)
    t, t_prev = 519, 499  # a step of the 50-step grid (steps_offset 0 -> timesteps 980, 960, ...)
    sched.timesteps = torch.tensor([t, t_prev])
    sched.num_inference_steps = 50
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    abar = sched.alphas_cumprod
    x0 = (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    expected = sched.step(eps, t, z, eta=0.0).prev_sample
    ours = ddim_step(x0, eps, abar[t_prev].sqrt(), (1 - abar[t_prev]).sqrt())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_pseudo_huber_values():
    a, b = torch.tensor([0.0, 0.1, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    c = 0.001
    expected = [math.sqrt(d * d + c * c) - c for d in (0.0, 0.1, -3.0)]
    torch.testing.assert_close(pseudo_huber(a, b, c), torch.tensor(expected))


def test_consistency_function_is_identity_at_t0():
    s = sd_schedule()
    z = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    f = consistency_function(out, z, torch.tensor([0, 0]), s, "epsilon")
    torch.testing.assert_close(f, z)


def test_lcd_loss_follows_algorithm_1():
    """A mock teacher with constant cond/uncond outputs: the target must see z_n from ONE batched teacher call,
    the guided DDIM step (cond + w (cond - uncond)), and the loss is pseudo-Huber of f(student) - f(target)."""
    s, settings = sd_schedule(), LCDSettings(w_min=2.0, w_max=6.0, huber_c=0.01)
    z0 = torch.randn(3, 4, 8, 8)
    cond = Conditioning(torch.ones(3, 5, 7))
    uncond = Conditioning(torch.zeros(3, 5, 7))
    eps_c, eps_u = torch.full_like(z0, 0.3), torch.full_like(z0, -0.2)
    calls, seen = [], {}

    def teacher(z, t, c, w):
        calls.append((z.shape[0], c.hidden_states[:, 0, 0].tolist()))
        return torch.cat([eps_c, eps_u])

    def student(z, t, c, w):
        seen["student"] = (z.clone(), t.clone(), w.clone())
        return torch.zeros_like(z)

    def target(z, t, c, w):
        seen["target"] = (z.clone(), t.clone())
        return torch.ones_like(z)

    nets = Nets(student, teacher, target, DiffusionTrajectory(s, "epsilon"))
    loss, _ = LCD(settings).loss(nets, Batch(z0, cond, uncond), torch.Generator().manual_seed(7))
    assert calls == [(6, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0])]

    # Recompute independently, drawing in the same order: index, noise, w.
    g = torch.Generator().manual_seed(7)
    t_nk = (torch.randint(0, 50, (3,), generator=g) + 1) * 20 - 1
    t_n = (t_nk - 20).clamp(min=0)
    eps = torch.randn(z0.shape, generator=g)
    w = 2.0 + 4.0 * torch.rand(3, generator=g)
    ab = s.alphas_cumprod.double()
    a_nk, s_nk = ab[t_nk].sqrt().view(3, 1, 1, 1), (1 - ab[t_nk]).sqrt().view(3, 1, 1, 1)
    a_n, s_n = ab[t_n].sqrt().view(3, 1, 1, 1), (1 - ab[t_n]).sqrt().view(3, 1, 1, 1)
    z_nk = a_nk * z0.double() + s_nk * eps.double()
    wv = w.double().view(3, 1, 1, 1)
    e_guided = eps_c.double() + wv * (eps_c.double() - eps_u.double())
    x_c, x_u = (z_nk - s_nk * eps_c.double()) / a_nk, (z_nk - s_nk * eps_u.double()) / a_nk
    x_guided = x_c + wv * (x_c - x_u)
    z_n = a_n * x_guided + s_n * e_guided
    torch.testing.assert_close(seen["student"][0].double(), z_nk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["student"][2], w)
    torch.testing.assert_close(seen["target"][0].double(), z_n, rtol=1e-4, atol=1e-4)
    assert seen["target"][1].tolist() == t_n.tolist()

    def f(z, t, x0):
        st = 10.0 * t.double().view(3, 1, 1, 1)
        return 0.25 / (st**2 + 0.25) * z + st / (st**2 + 0.25).sqrt() * x0

    f_student = f(z_nk, t_nk, z_nk / a_nk)  # epsilon output 0 -> x0_hat = z / alpha
    f_target = f(z_n, t_n, (z_n - s_n) / a_n)  # epsilon output 1
    expected = (((f_student - f_target) ** 2 + 0.01**2).sqrt() - 0.01).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
