"""`lcmkit demo --quick` end to end on a toy-world teacher of the shipped architecture (random weights here)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lcmkit.app.cli import main
from lcmkit.toy.demo import lora_pipeline
from lcmkit.toy.teacher import TeacherRecipe, build_text_encoder, build_unet, save_pipeline, teacher_tokenizer
from lcmkit.toy.vae import build_toy_vae


def make_toy_teacher(path) -> str:
    torch.manual_seed(0)
    recipe = TeacherRecipe(out="", vae="", unet_channels=(32, 32), text_hidden=32, text_layers=1)
    tok = teacher_tokenizer(recipe)
    save_pipeline(path, build_unet(recipe), build_text_encoder(recipe, len(tok)), build_toy_vae(), tok, torch.float32)
    return str(path)


def test_quick_demo_writes_grid_table_and_plot(tmp_path, capsys, monkeypatch):
    teacher = make_toy_teacher(tmp_path / "teacher")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--teacher", teacher, "--out", str(out)]) == 0
    assert "teacher DPM++ 25" in capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    labels = [c["label"] for c in record["columns"]]
    assert labels == ["teacher DPM++ 25", "teacher DPM++ 4", "LCM 1", "LCM 2", "LCM 4", "LCM TCD 4"]
    assert all(0 <= c["prompt_accuracy"] <= 1 and c["seconds_per_image"] > 0 for c in record["columns"])
    assert all(c["probe_fd"] > 0 for c in record["columns"])  # the shipped probe scores every column
    assert record["distill_steps"] == 20
    grid = Image.open(out / "grid.png")
    assert grid.width >= 6 * 96 and grid.height >= 2 * 96
    assert Image.open(out / "quality.png").width > 300
    assert "| LCM 4 | 4 |" in (out / "metrics.md").read_text()
    assert "- s/image: wall-clock seconds per image" in (out / "metrics.md").read_text()  # the table's legend

    # a fully distilled LCM-LoRA (here: the run above's) is shown beside a new live run, labelled as such
    again = tmp_path / "demo2"
    args = ["demo", "--quick", "--teacher", teacher, "--steps", "2", "--shipped-lora", str(out / "lcm-lora"),
            "--num-ddim-timesteps", "8", "--out", str(again)]  # fmt: skip
    assert main(args) == 0
    second = json.loads((again / "metrics.json").read_text())
    columns = {c["label"]: c for c in second["columns"]}
    assert list(columns)[-3:] == ["shipped LCM 2", "shipped LCM 4", "shipped TCD 4"]
    assert second["distill_steps"] == 2 and second["shipped_lora_steps"] == 20
    run = json.loads((again / "lcm-lora" / "lcmkit_run.json").read_text())
    assert run["config"]["lcd"]["num_ddim_timesteps"] == 8  # and its LCM columns sample on that grid:
    assert lora_pipeline(teacher, again / "lcm-lora").scheduler.config.original_inference_steps == 8
    assert lora_pipeline(teacher, out / "lcm-lora").scheduler.config.original_inference_steps == 50
    first = {c["label"]: c for c in record["columns"]}
    for metric in ("prompt_accuracy", "probe_fd"):  # same LoRA, prompts and noise as the first run's LCM 4
        assert abs(columns["shipped LCM 4"][metric] - first["LCM 4"][metric]) < 1e-6
        assert abs(columns["shipped TCD 4"][metric] - first["LCM TCD 4"][metric]) < 1e-6

    # a re-run interrupted while distilling leaves the previous run as it was (no half-old, half-empty folder)
    import lcmkit.toy.demo

    weights = (out / "lcm-lora" / "pytorch_lora_weights.safetensors").read_bytes()

    def interrupted(cfg, command=""):
        from pathlib import Path

        Path(cfg.train.out).mkdir(parents=True)
        (Path(cfg.train.out) / "pytorch_lora_weights.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(lcmkit.toy.demo, "distill", interrupted)
    assert main(["demo", "--quick", "--teacher", teacher, "--out", str(out)]) == 130
    assert (out / "lcm-lora" / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert json.loads((out / "lcm-lora" / "lcmkit_run.json").read_text())["config"]["train"]["out"] == str(
        out / "lcm-lora"
    )  # the finished run's record names the folder it was swapped into


def test_demo_without_teacher_says_what_to_do(tmp_path, capsys):
    assert main(["demo", "--quick", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "d")]) == 2
    assert "toy teacher" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--tcd-gamma", "1.5"), ("--num-ddim-timesteps", "0")])
def test_demo_refuses_a_bad_value_before_any_work(flag, value, tmp_path, capsys):
    assert main(["demo", "--quick", flag, value, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag} {value}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()


def make_toy_flow_teacher(path) -> str:
    """The toy flow teacher's architecture (a tiny SD3 over the toy VAE), random weights, small."""
    from lcmkit.toy import flow_teacher as ft
    from lcmkit.toy.tokenizer import load_toy_tokenizer

    torch.manual_seed(0)
    build_toy_vae().save_pretrained(path.parent / "flow-vae")
    recipe = ft.FlowTeacherRecipe(out="", vae="", num_layers=1, num_heads=2, head_dim=16, text_hidden=16, t5_dim=32)
    clip = load_toy_tokenizer()
    clip.model_max_length = recipe.clip_tokens
    tokenizers = [clip, clip, ft.toy_t5_tokenizer(recipe)]
    vae = ft.toy_flow_vae(str(path.parent / "flow-vae"))
    encoders = ft.build_text_encoders(recipe, clip, tokenizers[2])
    ft.save_pipeline(path, ft.build_transformer(recipe), encoders, vae, tokenizers, recipe.shift, torch.float32)
    return str(path)


def test_quick_flow_demo_shows_the_teachers_euler_beside_the_distilled_model(tmp_path, capsys):
    teacher = make_toy_flow_teacher(tmp_path / "flow-teacher")
    out = tmp_path / "demo"
    assert main(["demo", "--flow", "--quick", "--teacher", teacher, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher Euler 28" in printed and "its own Euler" in printed
    record = json.loads((out / "metrics.json").read_text())
    labels = [c["label"] for c in record["columns"]]
    assert labels == ["teacher Euler 28", "teacher Euler 1", "teacher Euler 2", "teacher Euler 4", "LCM 1", "LCM 2",
                      "LCM 4", "LCM Euler 2", "LCM Euler 4"]  # fmt: skip
    assert record["flow"] and all(c["probe_fd"] > 0 for c in record["columns"])
    by_label = {c["label"]: c for c in record["columns"]}
    assert by_label["LCM Euler 2"]["probe_fd"] != by_label["LCM 2"]["probe_fd"]  # another sampler, other images
    assert "Euler n: the same model on Euler steps" in printed
    lcm = by_label["LCM 4"]
    assert lcm["guidance"] == 1.0  # the LoRA learnt the teacher's guided ODE: no CFG at sampling
    run = json.loads((out / "lcm-lora" / "lcmkit_run.json").read_text())
    assert run["family"] == "sd3" and run["config"]["lcd"]["w_min"] == run["config"]["lcd"]["w_max"] == 4.0
    assert lora_pipeline(teacher, out / "lcm-lora").scheduler.__class__.__name__ == "FlowMatchLCMScheduler"
    assert Image.open(out / "grid.png").width >= 9 * 96 and (out / "quality.png").is_file()
