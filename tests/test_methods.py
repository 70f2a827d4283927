"""TCD and PCM beside LCD: their math against exact solutions, PCM's phases against diffusers' TCDScheduler, and
end-to-end runs on the tiny SD and SDXL teachers, full and LoRA."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_distill_e2e import distill_args, losses, run_cli

from lcmkit.core.flow import FlowSchedule
from lcmkit.core.schedule import append_dims
from lcmkit.core.trajectory import FlowTrajectory
from lcmkit.methods import METHODS
from lcmkit.methods.base import Batch, Nets
from lcmkit.methods.lcd import LCDSettings
from lcmkit.methods.tcd import PCM, TCD, PCMSettings, phase_edges


@dataclass
class PointMass:
    """Conditioning of the analytic model: the data point the teacher's trajectories run to, per example."""

    x: torch.Tensor

    def cat(self, other: PointMass) -> PointMass:
        return PointMass(torch.cat([self.x, other.x]))


def toward(target_of):
    """A velocity field whose trajectories run straight to target_of(cond, w): v = (x - target) / sigma."""
    return lambda z, t, cond, w: (z - target_of(cond, w)) / append_dims(t, z.ndim).clamp(min=1e-12)


def analytic_loss(method, student, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    c_star, u_star = torch.randn(6, 16, 4, 4, generator=g), torch.randn(6, 16, 4, 4, generator=g)
    teacher = toward(lambda cond, w: cond.x)
    nets = Nets(student(u_star), teacher, student(u_star), FlowTrajectory(FlowSchedule(shift=3.0)))
    loss, logs = method.loss(nets, Batch(c_star, PointMass(c_star), PointMass(u_star)), g)
    return loss.item(), logs


@pytest.mark.parametrize("method", [TCD(LCDSettings(w_min=1.0, w_max=6.0, num_ddim_timesteps=8, loss="l2")),
                                    PCM(LCDSettings(w_min=1.0, w_max=6.0, num_ddim_timesteps=8, loss="l2"),
                                        PCMSettings(num_phases=2))])  # fmt: skip
def test_an_exact_student_has_zero_loss_and_a_wrong_one_does_not(method):
    """Point-mass data: guided with w, every trajectory runs straight to g* = c* + w (c* - u*). The student whose
    velocity points at g* maps any z_t to the point of that line at s, as the target does from the teacher's z_t_n:
    zero loss for every end point s. The unguided teacher as a student is not consistent with the guided ODE."""

    def exact(u_star):
        return toward(lambda cond, w: cond.x + append_dims(w, cond.x.ndim) * (cond.x - u_star))

    def unguided(u_star):
        return toward(lambda cond, w: cond.x)

    loss, logs = analytic_loss(method, exact)
    assert loss < 1e-10
    assert logs["s_mean"] <= logs["t_mean"]
    assert analytic_loss(method, unguided)[0] > 1e-2


@pytest.mark.parametrize("num_phases", [1, 2, 4, 8])
def test_pcm_phases_are_the_steps_tcdscheduler_takes(num_phases):
    """PCM's phase edges on an N = 50 grid are the timesteps diffusers' TCDScheduler visits for K steps with
    original_inference_steps = 50 (and 0 at the end): gamma 0 samples exactly edge to edge."""
    from diffusers import TCDScheduler

    from lcmkit.core.schedule import ddim_timesteps

    grid = torch.cat([torch.zeros(1, dtype=torch.long), ddim_timesteps(1000, 50)])
    scheduler = TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             original_inference_steps=50)  # fmt: skip
    scheduler.set_timesteps(num_phases)
    edges = phase_edges(50, num_phases)
    assert edges[0] == 0 and len(edges) == num_phases + 1
    assert grid[edges[1:]].flip(0).tolist() == scheduler.timesteps.tolist()


def test_end_points():
    start = torch.arange(1, 51).repeat(400)
    tcd = TCD(LCDSettings(num_ddim_timesteps=50)).end_index(start, torch.Generator().manual_seed(0))
    assert (tcd < start).all() and (tcd >= 0).all() and set(tcd[start == 50].tolist()) == set(range(50))
    pcm = PCM(LCDSettings(num_ddim_timesteps=50), PCMSettings(num_phases=4)).end_index(start, None)
    edges = phase_edges(50, 4).tolist()  # [0, 13, 25, 38, 50]
    for i, j in zip(start.tolist(), pcm.tolist()):
        assert j == max(e for e in edges if e < i)
    assert sorted(METHODS) == ["lcd", "pcm", "tcd"]


@pytest.mark.parametrize("method", ["tcd", "pcm"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_methods_train_both_families_and_modes(tiny_sd, tiny_sdxl, shards, tmp_path, method, family, mode):
    teacher = tiny_sd if family == "sd" else tiny_sdxl
    out = tmp_path / "run"
    assert run_cli(*distill_args(teacher, shards, out, mode, "--method", method, "--max-steps", "4")) == 0
    values = losses(out)
    assert sorted(values) == [1, 2, 3, 4] and all(np.isfinite(list(values.values())))
    assert (out / ("pytorch_lora_weights.safetensors" if mode == "lora" else "pipeline/model_index.json")).is_file()


def test_pcm_lora_samples_in_k_deterministic_steps_and_resumes_exactly(tiny_sd, shards, tmp_path):
    """A PCM LoRA (K = 2) loads in diffusers' own pipeline and samples with TCDScheduler at gamma 0 (deterministic:
    two calls give one image), changing the base model's image; a resumed run retraces the uninterrupted one."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    common = ["--method", "pcm", "--num-phases", "2", "--checkpoint-every", "3", "--learning-rate", "1e-2"]
    whole, stopped = tmp_path / "a", tmp_path / "b"
    assert run_cli(*distill_args(tiny_sd, shards, whole, "lora", *common, "--max-steps", "6")) == 0
    assert run_cli(*distill_args(tiny_sd, shards, stopped, "lora", *common, "--max-steps", "4")) == 0
    (stopped / "lcmkit_run.json").unlink()
    assert run_cli(*distill_args(tiny_sd, shards, stopped, "lora", *common, "--max-steps", "6", "--resume",
                                 "latest")) == 0  # fmt: skip
    assert losses(stopped) == losses(whole)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red square", num_inference_steps=2, guidance_scale=1.0, eta=0.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    base = image()
    pipe.load_lora_weights(str(whole))
    a, b = image(), image()
    assert np.array_equal(a, b) and np.abs(a - base).max() > 1e-3
