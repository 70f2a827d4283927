"""`lcmkit bench distill` runs each mode (from raw data and from a cache) in its own process and reports
measured numbers."""

from __future__ import annotations

import json

import pytest

from lcmkit.app.cli import main


def test_bench_distill_reports_both_modes(tiny_sd, shards, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "distill", "--teacher", tiny_sd, "--data", shards, "--steps", "3", "--batch-size", "2",
            "--resolution", "64", "--lora-rank", "4", "--cache", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| lora | raw | no | 2 | 64 |" in printed and "| full | cache | no | 2 | 64 |" in printed
    record = json.loads(out.read_text())
    assert [(r["mode"], r["data"], r["compiled"]) for r in record["distill"]] == [
        ("lora", "raw", False), ("lora", "cache", False), ("full", "raw", False), ("full", "cache", False)
    ]  # fmt: skip
    assert record["distill"][1]["cache_build_s"] > 0
    for row in record["distill"]:
        assert row["median_s_per_step"] > 0 and row["samples_per_s"] > 0 and row["peak_rss_mb"] > 100
        # model FLOP/s: the step's denoiser passes per sample, counted by torch; no MFU without a GPU of known peak
        assert row["tflops_per_s"] == pytest.approx(row["step_tflop"] / row["median_s_per_step"]) and not row["mfu"]
    assert record["machine"]["cpus"] >= 1


def test_step_flops_count_the_denoiser_passes_and_mfu_knows_datacenter_gpus(tiny_sd):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lcmkit.families.teacher import ModelConfig, load_teacher
    from lcmkit.measure.bench import denoiser_forward_flops, step_passes
    from lcmkit.measure.system import peak_bf16_tflops

    teacher = load_teacher(ModelConfig(teacher=tiny_sd))
    text = torch.zeros(1, 77, teacher.denoiser.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher.denoiser(torch.zeros(1, 4, 8, 8), torch.tensor([500]), text)
    assert denoiser_forward_flops(tiny_sd, None, 64) == (counter.get_total_flops(), False)
    assert (step_passes("full", False), step_passes("lora", False), step_passes("lora", True)) == (6, 5, 4)
    assert peak_bf16_tflops("NVIDIA H200") == 989.0 and peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops(None) is None and peak_bf16_tflops("AMD EPYC") is None


def test_bench_reports_a_failed_run_in_one_line(tiny_sd, tmp_path, capsys):
    args = ["bench", "distill", "--teacher", tiny_sd, "--data", str(tmp_path / "none.tar"), "--steps", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lora run failed" in err and "none.tar" in err


def test_bench_generate_times_lcm_and_teacher(tiny_sd, tiny_sd_lora, tmp_path, capsys):
    out = tmp_path / "gen.json"
    args = ["bench", "generate", "--teacher", tiny_sd, "--lora", tiny_sd_lora, "--steps", "2", "--teacher-steps", "3",
            "--guidance", "5", "--resolution", "64", "--batch", "2", "--repeats", "3", "--warmup", "1",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| LCM-LoRA (lcmkit) | lcm | 2 | 1 | 2 | 64 |" in printed
    assert "| teacher | dpm++ | 3 | 5 | 2 | 64 |" in printed
    assert "median of 3 after 1 warm-up" in printed
    record = json.loads(out.read_text())
    lcm, teacher = record["generate"]
    assert lcm["unet_calls"] == 2 and teacher["unet_calls"] == 3  # one UNet call per step (CFG is one batch)
    for row in (lcm, teacher):
        assert len(row["end_to_end_s"]) == 3 and len(row["unet_s"]) == 3  # warm-up excluded
        assert 0 < row["unet_s_per_image"] < row["s_per_image"]
        assert row["images_per_s"] == pytest.approx(1 / row["s_per_image"])
        assert row["memory"] == "peak RSS" and row["peak_memory_mb"] > 100
    assert teacher["speedup_vs_teacher"] == 1.0
    assert record["config"]["device"] == "cpu" and record["config"]["steps"] == 2
    assert {"torch", "diffusers", "transformers", "cpus"} <= set(record["machine"])


def test_bench_generate_against_plain_diffusers(tiny_sd, tiny_sd_lora, tmp_path, capsys):
    out = tmp_path / "gen.json"
    args = ["bench", "generate", "--teacher", tiny_sd, "--lora", tiny_sd_lora, "--steps", "2", "--teacher-steps", "2",
            "--resolution", "64", "--repeats", "2", "--warmup", "0", "--vs-diffusers", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    ours, plain, teacher = json.loads(out.read_text())["generate"]
    assert ours["model"] == "LCM-LoRA (lcmkit)" and plain["model"] == "LCM-LoRA (plain diffusers)"
    assert ours["speedup_vs_diffusers"] == pytest.approx(plain["s_per_image"] / ours["s_per_image"])
    # same fused weights, same scheduler and seed: the same images (or all but identical)
    assert ours["psnr_vs_diffusers_db"] is None or ours["psnr_vs_diffusers_db"] > 40
    assert "the plain diffusers pipeline per image" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "{lora}", "--lcm", "{lora}"], "either --lora or --lcm"),
        (["--repeats", "0"], "--repeats 0"),
        (["--steps", "0"], "--steps 0"),
        (["--resolution", "60"], "--resolution 60"),
        (["--vs-diffusers"], "give --lora or --lcm"),
    ],
)
def test_bench_generate_refuses_bad_input_in_one_line(tiny_sd, tiny_sd_lora, capsys, extra, message):
    args = ["bench", "generate", "--teacher", tiny_sd, *(e.format(lora=tiny_sd_lora) for e in extra)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
