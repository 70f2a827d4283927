"""End to end through the CLI on tiny SD / SDXL teachers: distill, then load with diffusers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lcmkit.app.cli import main

STEPS = 10


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def distill_args(teacher: str, data: str, out: Path, mode: str, *extra: str) -> list[str]:
    return [
        "distill", "--teacher", teacher, "--data", data, "--out", str(out), "--mode", mode,
        "--max-steps", str(STEPS), "--batch-size", "2", "--resolution", "64", "--lora-rank", "4",
        "--num-ddim-timesteps", "50", "--checkpoint-every", "0", "--no-progress", "--log-every", "1",
        "--learning-rate", "1e-3", "--shuffle-buffer", "4", *extra,
    ]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def images(pipe, steps: int, guidance: float = 1.0, seed: int = 0) -> np.ndarray:
    out = pipe(
        "a red square", num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    )  # fmt: skip
    return out.images


@pytest.fixture(scope="module")
def sd_lora_run(tiny_sd, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd-lora")
    extra = ["--validation-prompts", "a red square", "--validation-every", "5", "--report-to", "tensorboard"]
    assert run_cli(*distill_args(tiny_sd, shards, out, "lora", *extra)) == 0
    return out


def test_sd_lora_loads_and_changes_the_image(tiny_sd, sd_lora_run):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = sd_lora_run
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "pytorch_lora_weights.safetensors", out / "README.md")}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as the other outputs
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["steps"] == STEPS and record["mode"] == "lora" and record["family"] == "sd"
    assert record["config"]["lora"]["lora_rank"] == 4 and "torch" in record["versions"]
    assert len(losses(out)) == STEPS and all(np.isfinite(list(losses(out).values())))
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard log"
    assert (out / "validation" / "step-00000005.png").is_file() and (out / "validation" / "step-00000010.png").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    before = images(pipe, 4)
    pipe.load_lora_weights(str(out))
    # every adapted module of the run is adapted after loading (none silently dropped)
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        in_file = {k.split(".lora")[0].removeprefix("unet.") for k in f.keys()}
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert loaded == in_file and any("attn1.to_q" in n for n in loaded)
    for steps in (1, 2, 4):
        after = images(pipe, steps)
        assert after.shape == (1, 64, 64, 3) and np.isfinite(after).all()
    after = images(pipe, 4)
    assert np.abs(after - before).max() > 1e-3, "the LoRA did not change the image"
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.0])
    np.testing.assert_allclose(images(pipe, 4), before, atol=1e-5)


def test_sd_full_lcm_loads_in_lcm_pipeline(tiny_sd, shards, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    out = tmp_path / "sd-full"
    assert run_cli(*distill_args(tiny_sd, shards, out, "full")) == 0
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.time_cond_proj_dim == 256
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        img = images(pipe, steps, guidance=8.0)
        assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # w is an input: different guidance gives a different image after training
    assert np.abs(images(pipe, 4, guidance=2.0) - images(pipe, 4, guidance=12.0)).max() > 1e-4
    # the EMA target was exported; the online student is kept too and differs from it
    online = UNet2DConditionModel.from_pretrained(out / "unet_online")
    diff = max((a - b).abs().max().item() for a, b in zip(unet.parameters(), online.parameters()))
    assert diff > 0


def test_sdxl_lora_and_full(tiny_sdxl, shards, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    out = tmp_path / "sdxl-lora"
    assert run_cli(*distill_args(tiny_sdxl, shards, out, "lora")) == 0
    # SDXL's pipeline uses zeros for an empty negative prompt (force_zeros_for_empty_prompt): so does LCD
    assert json.loads((out / "lcmkit_run.json").read_text())["uncond"] == "zeros"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    before = images(pipe, 2)
    pipe.load_lora_weights(str(out))
    for steps in (1, 2, 4):
        assert np.isfinite(images(pipe, steps)).all()
    assert np.abs(images(pipe, 2) - before).max() > 1e-3

    out = tmp_path / "sdxl-full"
    assert run_cli(*distill_args(tiny_sdxl, shards, out, "full", "--uncond", "zeros")) == 0
    full = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    assert isinstance(full.scheduler, LCMScheduler) and full.unet.config.time_cond_proj_dim == 256
    full.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        assert np.isfinite(images(full, steps, guidance=8.0)).all()


def test_v_prediction_teacher_distills(tiny_sd_v, shards, tmp_path):
    out = tmp_path / "v"
    extra = ["--max-steps", "3", "--gradient-accumulation-steps", "2", "--mixed-precision", "bf16"]
    assert run_cli(*distill_args(tiny_sd_v, shards, out, "lora", *extra)) == 0
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["prediction_type"] == "v_prediction" and record["config"]["train"]["mixed_precision"] == "bf16"
    assert all(np.isfinite(list(losses(out).values())))


def test_resume_reproduces_the_uninterrupted_run(tiny_sd, shards, tmp_path):
    common = ["--checkpoint-every", "4", "--seed", "3"]
    full_run = tmp_path / "a"
    assert run_cli(*distill_args(tiny_sd, shards, full_run, "full", *common)) == 0
    stopped = tmp_path / "b"
    assert run_cli(*distill_args(tiny_sd, shards, stopped, "full", *common, "--max-steps", "6")) == 0
    # step 6 is not a checkpoint: the resumed run restarts from checkpoint 4 and must retrace 5..10
    (stopped / "lcmkit_run.json").unlink()
    log = stopped / "logs" / "train_log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:4]))
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "checkpoint-00000004"
    assert run_cli(*distill_args(tiny_sd, shards, stopped, "full", *common, "--resume", "latest")) == 0
    a, b = losses(full_run), losses(stopped)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
