"""Export round trips: kohya keys, fused pipeline folders; each gives the same image as the diffusers LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lcmkit.app.cli import main


@pytest.fixture(scope="module")
def sd_lora(tiny_sd, shards, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lora")
    args = ["distill", "--teacher", tiny_sd, "--data", shards, "--out", str(out), "--max-steps", "3", "--batch-size",
            "2", "--resolution", "64", "--lora-rank", "4", "--lora-alpha", "8", "--learning-rate", "1e-2"]  # fmt: skip
    assert main(args + ["--no-progress"]) == 0
    return str(out)


def image(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(3)
    return pipe("a red square", num_inference_steps=4, guidance_scale=1.0, height=64, width=64, generator=g,
                output_type="np").images[0]  # fmt: skip


def lcm_pipe(folder: str):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_kohya_export_loads_in_diffusers_to_the_same_image(tiny_sd, sd_lora, tmp_path):
    pipe = lcm_pipe(tiny_sd)
    base = image(pipe)
    pipe.load_lora_weights(sd_lora)
    reference = image(pipe)
    assert np.abs(reference - base).max() > 1e-3

    kohya = tmp_path / "lcm_kohya.safetensors"
    assert main(["export", "kohya", sd_lora, "--out", str(kohya)]) == 0
    with safe_open(str(kohya), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys) and alphas == {8.0}
    pipe = lcm_pipe(tiny_sd)
    pipe.load_lora_weights(str(kohya))
    np.testing.assert_allclose(image(pipe), reference, atol=1e-4)

    back = tmp_path / "back"
    assert main(["export", "diffusers", str(kohya), "--base", tiny_sd, "--out", str(back)]) == 0
    pipe = lcm_pipe(tiny_sd)
    pipe.load_lora_weights(str(back))
    np.testing.assert_allclose(image(pipe), reference, atol=1e-4)


def test_fused_pipeline_matches_the_unfused_lora(tiny_sd, sd_lora, tmp_path):
    pipe = lcm_pipe(tiny_sd)
    pipe.load_lora_weights(sd_lora)
    reference = image(pipe)
    fused = tmp_path / "fused"
    assert main(["export", "fused", sd_lora, "--base", tiny_sd, "--out", str(fused)]) == 0
    reloaded = lcm_pipe(str(fused))
    np.testing.assert_allclose(image(reloaded), reference, atol=1e-4)
    assert not any("lora" in n for n, _ in reloaded.unet.named_parameters())


def test_info_says_what_each_output_is(tiny_sd, sd_lora, tmp_path, capsys):
    import json

    from lcmkit.families.single_file import export_single_file

    def info(path) -> dict:
        assert main(["info", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    lora = info(f"{sd_lora}/pytorch_lora_weights.safetensors")  # the folder is a run: see the next test
    assert lora["kind"] == "LoRA" and lora["format"] == "diffusers/peft" and lora["rank"] == 4 and lora["alpha"] == 8
    assert "to_q" in lora["targets"] and "conv1" in lora["targets"]
    assert lora["base_family"] == "unknown (cross-attention width 32)"  # the tiny teacher's text width
    kohya = tmp_path / "k.safetensors"
    assert main(["export", "kohya", sd_lora, "--out", str(kohya)]) == 0
    capsys.readouterr()
    assert info(kohya)["format"] == "kohya/webui" and info(kohya)["modules"] == lora["modules"]
    pipe = info(tiny_sd)
    assert pipe["kind"] == "pipeline" and pipe["family"] == "sd" and pipe["full_lcm"] is False
    single = export_single_file(tiny_sd, str(tmp_path / "m.safetensors"))
    assert info(single) == {"path": str(single), "kind": "single-file checkpoint", "family": "sd", "full_lcm": False,
                            "tensors": info(single)["tensors"]}  # fmt: skip
    assert main(["info", str(tmp_path / "nothing")]) == 2
    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"x")
    assert main(["info", str(bogus)]) == 2 and "pickle" in capsys.readouterr().err


def test_sdxl_kohya_export_loads_in_diffusers_to_the_same_image(tiny_sdxl, shards, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    lora = tmp_path / "lora"
    args = [
        "distill",
        "--teacher",
        tiny_sdxl,
        "--data",
        shards,
        "--out",
        str(lora),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--resolution",
        "64",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-2",
        "--no-progress",
    ]
    assert main(args) == 0

    def pipe_with(lora_path: str | None):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if lora_path:
            pipe.load_lora_weights(lora_path)
        return pipe

    base, reference = image(pipe_with(None)), image(pipe_with(str(lora)))
    assert np.abs(reference - base).max() > 1e-3
    kohya = tmp_path / "xl_kohya.safetensors"
    assert main(["export", "kohya", str(lora), "--out", str(kohya)]) == 0
    with safe_open(str(kohya), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
    np.testing.assert_allclose(image(pipe_with(str(kohya))), reference, atol=1e-4)


def test_info_shows_a_run_an_image_and_whole_target_names(tiny_sd, shards, sd_lora, tmp_path, capsys):
    import json

    from PIL import Image

    from lcmkit.formats.info import describe, target_name

    assert target_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0") == "to_out.0"
    assert target_name("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2") == "ff.net.2"
    assert target_name("down_blocks.0.downsamplers.0.conv") == "downsamplers.0.conv"
    assert target_name("down_blocks_0_resnets_0_conv1", kohya=True) == "conv1"
    targets = describe(f"{sd_lora}/pytorch_lora_weights.safetensors")["targets"]
    assert not {"0", "2", "conv"} & set(targets) and {"to_out.0", "ff.net.2"} <= set(targets)

    out = tmp_path / "run"
    args = ["distill", "--teacher", tiny_sd, "--data", shards, "--out", str(out), "--max-steps", "2", "--batch-size",
            "2", "--resolution", "64", "--lora-rank", "4", "--num-ddim-timesteps", "8", "--w-min", "2", "--w-max",
            "6", "--no-progress", "--log-every", "1"]  # fmt: skip
    assert main(args) == 0
    run = describe(out)
    assert run["kind"] == "lcmkit run" and run["mode"] == "lora" and run["teacher"] == tiny_sd and run["steps"] == 2
    assert run["num_ddim_timesteps"] == 8 and run["w_range"] == "2-6" and run["final_loss"] > 0
    assert run["weights"].startswith("pytorch_lora_weights.safetensors: LoRA rank 4")

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    capsys.readouterr()
    assert main(["info", str(image), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "image" and shown["size"] == "8x8" and "pickle" not in json.dumps(shown)
