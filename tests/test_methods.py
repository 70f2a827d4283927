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


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_travelled_samples_have_the_marginal_of_noised_data(kind):
    """Carried on from s to t by the forward process, a sample alpha_s x0 + sigma_s e keeps x0's coefficient of the
    direct noising to t, alpha_t, and its noise has sigma_t's variance; from s to s it is left as it is."""
    from test_lcd_math import sd_schedule

    from lcmkit.core.trajectory import DiffusionTrajectory

    ode = DiffusionTrajectory(sd_schedule(), "epsilon") if kind == "vp" else FlowTrajectory(FlowSchedule(shift=3.0))
    grid = ode.grid(50)
    s, t = grid[torch.tensor([0, 3, 10, 10, 25, 49])], grid[torch.tensor([7, 3, 11, 50, 40, 50])]
    x0, one, zero = torch.randn(6, 4, 2, 2), torch.ones(6, 4, 2, 2), torch.zeros(6, 4, 2, 2)
    assert torch.allclose(ode.travelled(ode.noised(x0, zero, s), zero, s, t), ode.noised(x0, zero, t), atol=1e-5)
    carried = ode.travelled(ode.noised(zero, one, s), zero, s, t)  # the part of the noise at s
    fresh = ode.travelled(zero, one, s, t)  # the noise added on the way
    assert torch.allclose(carried**2 + fresh**2, ode.noised(zero, one, t) ** 2, atol=1e-5)
    assert torch.equal(fresh[1], zero[1]) and (fresh[2:] > 0).all()


def test_pcm_adversarial_term_judges_the_phase_edge_against_the_target():
    """PCM's adversarial term judges phase edges: the fake is the student's estimate f(z_t, t, s), carried on to a
    grid time t' of the phase above s; the real is the data noised to t', or the target's f(z_t_n, t_n, s) carried on
    alike (PCM's adversarial consistency loss), with the same noise. TCD judges its origin estimates."""
    from lcmkit.methods.adversarial import Adversarial, AdversarialSettings, Discriminator

    def student(u_star):
        return toward(lambda cond, w: cond.x + 0.5 * append_dims(w, cond.x.ndim) * (cond.x - u_star))

    g = torch.Generator().manual_seed(0)
    c_star, u_star = torch.randn(64, 4, 2, 2, generator=g), torch.randn(64, 4, 2, 2, generator=g)
    nets = Nets(student(u_star), toward(lambda cond, w: cond.x), student(u_star), FlowTrajectory(FlowSchedule(3.0)))
    batch = Batch(c_star, PointMass(c_star), PointMass(u_star))
    pcm = PCM(LCDSettings(w_min=1.0, w_max=6.0, num_ddim_timesteps=8), PCMSettings(num_phases=2))
    pcm.loss(nets, batch, g)
    judged = pcm.judged
    assert set(judged.lo.tolist()) == {0, 4} and (judged.hi == torch.where(judged.lo == 0, 4, 8)).all()
    assert not torch.equal(judged.fake, judged.target)
    ode, grid, zero = nets.trajectory, nets.trajectory.grid(8), torch.zeros_like(c_star)
    for real in ("data", "target"):
        settings = AdversarialSettings(adversarial_weight=1.0, adversarial_real=real)
        real_t, fake_t, t = Adversarial(pcm, settings, Discriminator([4]), None).noised_pair(nets, batch, judged, g)
        assert ((t >= grid[judged.lo]) & (t < grid[judged.hi])).all() and len(set(t.tolist())) == 8
        eps = (fake_t - ode.travelled(judged.fake, zero, grid[judged.lo], t)) / (ode.travelled(zero, 1 + zero,
                                                                                   grid[judged.lo], t) + 1e-30)
        real_from = ode.noised(c_star, eps, t) if real == "data" else ode.travelled(judged.target, eps,
                                                                                 grid[judged.lo], t)  # fmt: skip
        noised = t > grid[judged.lo]
        assert noised.sum() > 16 and torch.allclose(real_t[noised], real_from[noised], atol=1e-4)  # the same noise
    one_phase = PCM(LCDSettings(w_min=1.0, w_max=6.0, num_ddim_timesteps=8), PCMSettings(num_phases=1))
    one_phase.loss(nets, batch, g)
    assert (one_phase.judged.lo == 0).all() and (one_phase.judged.hi == 8).all()
    tcd = TCD(LCDSettings(w_min=1.0, w_max=6.0, num_ddim_timesteps=8))
    tcd.loss(nets, batch, g)
    assert tcd.judged.lo is None  # both origin estimates are the point the student runs to (but from t_n = 0)
    assert ((tcd.judged.fake - tcd.judged.target).abs().flatten(1).amax(1) < 1e-4).float().mean() > 0.75


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
    card = (whole / "README.md").read_text()  # the card says how: the same scheduler, steps and eta
    assert "TCDScheduler.from_config" in card and "num_inference_steps=2, eta=0.0" in card and "PCM, 2 phases" in card


def lora_with_alpha(teacher: str, out, alpha: float = 8.0):
    """A rank-4 LoRA with alpha 8 (scale 2) on to_q/to_k and random B weights, written by lcmkit's writer."""
    from diffusers import UNet2DConditionModel

    from lcmkit.families import get_family
    from lcmkit.families.models import LoraConfig, lora_config, save_lora

    unet = UNet2DConditionModel.from_pretrained(f"{teacher}/unet")
    cfg = LoraConfig(lora_rank=4, lora_alpha=alpha, lora_target_modules=["to_q", "to_k"])
    unet.add_adapter(lora_config(cfg, get_family("sd")))
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, 0.05)
    out.mkdir(parents=True, exist_ok=True)
    return save_lora(unet, get_family("sd"), out, cfg)


def test_init_lora_starts_from_the_file_with_its_rank_alpha_and_targets(tiny_sd, shards, tmp_path, capsys):
    """--init-lora: one step at a vanishing learning rate leaves the adapter as the file had it (same keys, same
    weights, alpha 8 kept), so the output draws the file's image in diffusers; a kohya file of it starts the same
    way; a LoRA of another model and --mode full get one line."""
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    source = lora_with_alpha(tiny_sd, tmp_path / "src")
    args = ["--max-steps", "1", "--learning-rate", "1e-12", "--init-lora"]
    out = tmp_path / "out"
    assert run_cli(*distill_args(tiny_sd, shards, out, "lora", *args, str(source))) == 0
    lora = json.loads((out / "lcmkit_run.json").read_text())["config"]["lora"]
    assert (lora["lora_rank"], lora["lora_alpha"]) == (4, 8.0)
    a, b = load_file(source), load_file(out / "pytorch_lora_weights.safetensors")
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-9

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def image(folder):
        pipe.load_lora_weights(str(folder))
        img = pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        pipe.unload_lora_weights()
        return img

    base = pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    original = image(source.parent)
    assert np.abs(original - base).max() > 1e-3
    np.testing.assert_allclose(image(out), original, atol=1e-5)

    kohya = tmp_path / "kohya.safetensors"
    assert run_cli("export", "kohya", str(source), "--out", str(kohya)) == 0
    from_kohya = tmp_path / "from-kohya"
    assert run_cli(*distill_args(tiny_sd, shards, from_kohya, "lora", *args, str(kohya))) == 0
    np.testing.assert_allclose(image(from_kohya), original, atol=1e-5)

    capsys.readouterr()
    assert run_cli(*distill_args(tiny_sd, shards, tmp_path / "x", "full", *args, str(source))) == 2
    assert "--init-lora" in capsys.readouterr().err


def test_init_lora_for_another_model_is_refused(tiny_sd, tiny_sdxl, shards, tmp_path, capsys):
    xl = tmp_path / "xl"
    assert run_cli(*distill_args(tiny_sdxl, shards, xl, "lora", "--max-steps", "1")) == 0
    capsys.readouterr()
    assert run_cli(*distill_args(tiny_sd, shards, tmp_path / "x", "lora", "--init-lora", str(xl))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcmkit: error: --init-lora") and len(err.splitlines()) == 1, err


def test_quality_is_watched_and_the_best_weights_kept(tiny_sd, shards, tmp_path, capsys):
    """--watch-quality: at each validation the student is scored against the teacher's 50-step images of the same
    prompts and seeds; logs/quality.jsonl holds every score, best/ the weights of the best mean PSNR, and the card
    and run record say which step that was."""
    import json

    out = tmp_path / "run"
    args = ["--max-steps", "6", "--validation-every", "2", "--validation-prompts", "a red square", "a blue square",
            "--watch-quality", "--learning-rate", "1e-2"]  # fmt: skip
    assert run_cli(*distill_args(tiny_sd, shards, out, "lora", *args)) == 0
    rows = [json.loads(line) for line in (out / "logs" / "quality.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r[f"quality/psnr_{n}"]) and 0 <= r[f"quality/ms_ssim_distance_{n}"] <= 1
               for r in rows for n in (1, 2, 4))  # fmt: skip
    best = max(rows, key=lambda r: r["quality/psnr_mean"])
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["best"]["step"] == best["step"] == json.loads((out / "best" / "best.json").read_text())["step"]
    assert (out / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert f"the best was step {best['step']}" in (out / "README.md").read_text()
    capsys.readouterr()
    assert run_cli(*distill_args(tiny_sd, shards, tmp_path / "x", "lora", "--watch-quality")) == 2
    assert "--validation-every" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_adversarial_term_trains_a_discriminator_and_resumes_exactly(tiny_sd, tiny_sdxl, tiny_sd3, shards, tmp_path,
                                                                     family, mode):  # fmt: skip
    """--adversarial-weight: a discriminator on the teacher's own features is trained as a second update (its loss
    logged), lambda ramps over the warm-up, and a run stopped after its step-3 checkpoint and resumed retraces the
    uninterrupted one: discriminator, its optimizer and the warm-up counter are in the checkpoint. SD3: the heads
    read the joint blocks' image tokens as maps. PCM (SDXL and SD3 LoRA) judges its phase edges instead;
    TCD and PCM have their own default discriminator learning rate."""
    import json

    teacher = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3}[family]
    method = "tcd" if mode == "full" else "lcd" if family == "sd" else "pcm"
    common = ["--adversarial-weight", "0.5", "--adversarial-warmup", "4", "--checkpoint-every", "3", "--method",
              method]  # fmt: skip
    if family == "sd3" and mode == "full":  # a full SD3 student learns one guidance scale
        common += ["--w-min", "3.5", "--w-max", "3.5"]
    whole, stopped = tmp_path / "a", tmp_path / "b"
    assert run_cli(*distill_args(teacher, shards, whole, mode, *common, "--max-steps", "6")) == 0
    rows = [json.loads(line) for line in (whole / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["adversarial_weight"] for r in rows] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert all(np.isfinite(r["loss_discriminator"]) for r in rows)
    recorded = json.loads((whole / "lcmkit_run.json").read_text())["config"]["adversarial"]["discriminator_lr"]
    assert recorded == (1e-4 if method == "lcd" else 1e-5)  # no --discriminator-lr: the method's default
    assert run_cli(*distill_args(teacher, shards, stopped, mode, *common, "--max-steps", "4")) == 0
    (stopped / "lcmkit_run.json").unlink()
    assert run_cli(*distill_args(teacher, shards, stopped, mode, *common, "--max-steps", "6", "--resume",
                                 "latest")) == 0  # fmt: skip
    assert losses(stopped) == losses(whole)


def test_adversarial_term_is_refused_for_flow_teachers_in_one_line(tiny_flux, shards, tmp_path, capsys):
    assert run_cli(*distill_args(tiny_flux, shards, tmp_path / "o", "lora", "--adversarial-weight", "0.1")) == 2
    err = capsys.readouterr().err.strip()
    assert "not available for FLUX.1" in err and len(err.splitlines()) == 1


def test_adversarial_lora_from_a_cache_and_phases_checked_for_pcm_only(tiny_sd, shards, tmp_path):
    """A cached LoRA run frees the text encoders: the discriminator is sized before that (LCD, and 2-phase PCM
    against its target). --num-phases is PCM's: a short grid is fine for LCD."""
    from lcmkit.distill.config import load_config, validate
    from lcmkit.errors import ConfigError

    cache = tmp_path / "cache"
    assert run_cli("cache", "--teacher", tiny_sd, "--data", shards, "--resolution", "64", "--out", str(cache),
                   "--no-progress") == 0  # fmt: skip
    out = tmp_path / "run"
    assert run_cli(*distill_args(tiny_sd, f"cache:{cache}", out, "lora", "--adversarial-weight", "0.1",
                                 "--max-steps", "2")) == 0  # fmt: skip
    assert run_cli(*distill_args(tiny_sd, f"cache:{cache}", tmp_path / "pcm", "lora", "--adversarial-weight", "0.1",
                                 "--method", "pcm", "--num-phases", "2", "--adversarial-real", "target",
                                 "--max-steps", "1")) == 0  # fmt: skip
    required = {"teacher": "t", "data": "d", "out": "o", "num_ddim_timesteps": 2}
    assert validate(load_config(None, required)).lcd.num_ddim_timesteps == 2
    with pytest.raises(ConfigError, match="--num-phases 4"):
        validate(load_config(None, {**required, "method": "pcm"}))


@pytest.mark.parametrize("method,scheduler,eta", [("lcd", "LCMScheduler", None), ("tcd", "TCDScheduler", 0.3),
                                                  ("pcm", "TCDScheduler", 0.0)])  # fmt: skip
def test_validation_draws_a_student_on_its_methods_sampler(tiny_sd, shards, tmp_path, monkeypatch, method, scheduler,
                                                           eta):  # fmt: skip
    """Validation grids (and --watch-quality's scores) of a TCD or PCM student come from TCDScheduler at the
    method's eta, as its users will sample it; an LCD student's from LCMScheduler."""
    import lcmkit.distill.validation as validation

    seen = []
    real = validation.run_batched

    def spy(pipe, *args, **kwargs):
        seen.append((type(pipe.scheduler).__name__, kwargs.get("eta")))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(validation, "run_batched", spy)
    args = ["--method", method, "--max-steps", "2", "--validation-every", "2", "--validation-prompts", "a red square"]
    assert run_cli(*distill_args(tiny_sd, shards, tmp_path / "run", "lora", *args)) == 0
    assert seen and set(seen) == {(scheduler, eta)}


def test_watch_quality_on_the_toy_world_scores_the_probe_metrics(shards, tmp_path):
    """--teacher toy --watch-quality: beside the agreement with the teacher, each validation scores the toy world's
    prompt accuracy and probe-FD of the student's images."""
    import json

    from lcmkit.toy.demo import toy_prompts

    prompts = toy_prompts(4, 0)
    args = ["distill", "--teacher", "toy", "--data", shards, "--out", str(tmp_path / "run"), "--resolution", "32",
            "--max-steps", "2", "--batch-size", "2", "--lora-rank", "4", "--validation-every", "2",
            "--validation-prompts", *prompts, "--validation-steps", "1", "2", "--watch-quality",
            "--no-progress"]  # fmt: skip
    assert run_cli(*args) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "logs" / "quality.jsonl").read_text().splitlines()]
    for n in (1, 2):
        assert 0 <= row[f"quality/prompt_accuracy_{n}"] <= 1 and np.isfinite(row[f"quality/psnr_{n}"])
    assert any(key.startswith("quality/probe_fd") for key in row)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_flow_euler_grid_is_the_tcdscheduler_grid(steps):
    """A flow student's Euler sigmas (infer/sampling.grid_sigmas) are the points a UNet's TCDScheduler visits on the
    same N-point grid, (t + 1) / 1000, and for PCM the phase edges it was trained between."""
    from diffusers import TCDScheduler

    from lcmkit.infer.sampling import grid_sigmas
    from lcmkit.methods.tcd import phase_edges

    tcd = TCDScheduler(num_train_timesteps=1000, original_inference_steps=50)
    tcd.set_timesteps(steps)
    assert grid_sigmas(steps, 50) == pytest.approx([(int(t) + 1) / 1000 for t in tcd.timesteps])
    assert grid_sigmas(steps, 50) == pytest.approx([int(i) / 50 for i in phase_edges(50, steps).flip(0)[:-1]])



def test_validation_draws_a_flow_pcm_student_edge_to_edge(tiny_sd3, shards, tmp_path, monkeypatch):
    """A flow PCM student is drawn with deterministic Euler steps between its phase edges (diffusers has no flow TCD
    scheduler): FlowMatchEulerDiscreteScheduler with the edges' sigmas for each validation step count."""
    import lcmkit.distill.validation as validation

    seen = []
    real = validation.run_batched

    def spy(pipe, *args, **kwargs):
        seen.append((type(pipe.scheduler).__name__, kwargs["num_inference_steps"], kwargs.get("sigmas")))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(validation, "run_batched", spy)
    args = ["--method", "pcm", "--num-phases", "2", "--max-steps", "2", "--validation-every", "2",
            "--validation-prompts", "a red square", "--validation-steps", "1", "2", "--num-ddim-timesteps", "10"]
    assert run_cli(*distill_args(tiny_sd3, shards, tmp_path / "run", "lora", *args)) == 0
    assert seen == [("FlowMatchEulerDiscreteScheduler", 1, [1.0]), ("FlowMatchEulerDiscreteScheduler", 2, [1.0, 0.5])]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "num_inference_steps=2, sigmas=[1, 0.5]" in card and "--scheduler euler" in card


def test_token_map_inverts_the_patch_embedding_layout():
    """SD3's PatchEmbed flattens its (B, D, H / p, W / p) conv output row-major into tokens (flatten(2).transpose(1,
    2)); the discriminator's map of a joint block's image tokens undoes exactly that. Blocks are picked evenly, the
    last included."""
    from lcmkit.families.transformer import feature_modules, token_map

    grid = torch.randn(2, 8, 3, 5)
    tokens = grid.flatten(2).transpose(1, 2)
    z_t = torch.zeros(2, 16, 6, 10)  # patch size 2
    assert torch.equal(token_map((None, tokens), z_t), grid)

    class Net(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(n))

    assert feature_modules(Net(24)) == [f"transformer_blocks.{i}" for i in (6, 12, 17, 23)]
    assert feature_modules(Net(3)) == [f"transformer_blocks.{i}" for i in range(3)]
