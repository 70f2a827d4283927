"""`lcmkit eval`: metrics with known answers, the report end to end on tiny teachers, one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lcmkit.app.cli import main
from lcmkit.measure.eval import (
    clip_score,
    feature_fd,
    fid_scorer,
    ms_ssim_distance,
    parse_steps,
    psnr,
    seconds_per_image,
    to_unit_tensor,
)

torch.set_num_threads(1)


def smooth_images(n: int = 3, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Natural-ish test images in [0, 1]: upsampled low-resolution noise (structure at several scales)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g, dtype=torch.float64)
    fine = torch.rand(n, 3, size // 2, size // 2, generator=g, dtype=torch.float64)
    up = torch.nn.functional.interpolate
    return 0.7 * up(coarse, size=(size, size), mode="bilinear") + 0.3 * up(fine, size=(size, size), mode="bilinear")


# -- metrics ----------------------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_inf():
    x = smooth_images()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


def test_psnr_matches_the_formula_at_a_known_noise_level():
    x = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    sign = torch.where(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    for d in (0.01, 0.1):
        expected = 10 * math.log10(1.0 / d**2)  # MSE is exactly d^2
        np.testing.assert_allclose(psnr(x, x + d * sign).numpy(), [expected, expected], rtol=1e-6)
    assert psnr(x * 255, x * 255 + 2.55 * sign, data_range=255.0)[0] == pytest.approx(40.0)


def test_frechet_distance_of_a_set_against_itself_and_a_shifted_copy():
    features = np.random.default_rng(0).normal(size=(400, 6)) @ np.diag([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    assert feature_fd(features, features) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([0.5, -1.0, 0.0, 2.0, 0.25, 0.0])
    # same covariance, so the trace terms cancel: FD = |shift|^2 exactly
    assert feature_fd(features, features + shift) == pytest.approx(float(shift @ shift), rel=1e-7)


def test_ms_ssim_distance_is_zero_for_identical_images_and_grows_with_distortion():
    x = smooth_images()
    assert torch.equal(ms_ssim_distance(x, x), torch.zeros(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    distances = [float(ms_ssim_distance(x, (x + s * noise).clamp(0, 1)).mean()) for s in (0.01, 0.03, 0.1, 0.3)]
    assert distances[0] > 0 and distances == sorted(distances) and distances[-1] > 5 * distances[0]
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert 0 < float(ms_ssim_distance(x, blurred).mean()) < 1
    assert torch.allclose(ms_ssim_distance(x, blurred), ms_ssim_distance(blurred, x))  # symmetric


def test_ms_ssim_distance_works_at_toy_sizes():
    for size in (8, 32, 64):
        x = smooth_images(2, size)
        d = ms_ssim_distance(x, (x + 0.1).clamp(0, 1))
        assert torch.isfinite(d).all() and (d > 0).all()


def test_clip_score_and_seconds_per_image():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert clip_score(a, a) == pytest.approx(100.0)
    assert clip_score(a, torch.tensor([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(0.0)  # orthogonal, opposite
    assert seconds_per_image(3.0, 4) == 0.75
    with pytest.raises(ValueError):
        seconds_per_image(1.0, 0)


def test_fid_scorer_reuses_reference_features():
    calls = []

    def features(images):
        calls.append(len(images))
        return to_unit_tensor(images).flatten(1).numpy()[:, :5]

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(8)]
    score = fid_scorer(features)
    assert score(images, [], images)["fid"] == pytest.approx(0.0, abs=1e-8)
    assert score(images[::-1], [], images)["fid"] == pytest.approx(0.0, abs=1e-8)  # a set, not pairs
    assert calls == [8, 8, 8]  # the reference once, then each sampler


def test_parse_steps():
    assert parse_steps("8,1, 2,4,2") == [1, 2, 4, 8]
    for bad in ("0", "1,-2", "a", ""):
        with pytest.raises(Exception, match="--steps"):
            parse_steps(bad)


# -- end to end ---------------------------------------------------------------------------------------------


def strict_json(path) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_quick_eval_on_the_tiny_teacher_writes_the_report(tiny_sd, tiny_sd_lora, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LCMKIT_CLIP", raising=False)
    monkeypatch.delenv("LCMKIT_INCEPTION", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", tiny_sd, "--lora", tiny_sd_lora, "--prompts", prompts, "--quick", "--out", out,
            "--no-progress", "--seed", "3"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    assert "CLIP score skipped" in captured.err and "FID skipped" in captured.err and "never downloads" in captured.err
    record = strict_json(out / "eval.json")
    labels = [c["label"] for c in record["columns"]]
    teacher = [f"teacher {s} {n}" for s in ("DDIM", "DPM++") for n in (1, 2, 25, 50)]
    assert labels == ["LCM-LoRA 1", "LCM-LoRA 2", *teacher]
    cols = {c["label"]: c for c in record["columns"]}
    ref = cols["teacher DDIM 50"]
    assert ref["psnr"] is None and ref["ms_ssim_distance"] == 0.0  # the reference itself
    for label in labels[:-6] + ["teacher DPM++ 50"]:
        c = cols[label]
        assert 0 < c["psnr"] < 100 and 0 < c["ms_ssim_distance"] <= 1 and c["seconds_per_image"] > 0, label
    assert cols["teacher DDIM 25"]["psnr"] > cols["teacher DDIM 1"]["psnr"]  # more steps, closer to 50 steps
    assert cols["teacher DPM++ 50"]["psnr"] > 30  # two converged samplers agree only from the same noise
    assert cols["LCM-LoRA 1"]["guidance"] == 1.0 and ref["guidance"] == 7.5
    assert record["n_images"] == 2 and record["resolution"] == 64 and "diffusers" in record["machine"]
    table = (out / "eval.md").read_text()
    assert table.startswith("| sampler | steps | guidance | PSNR vs ref (dB) | 1-MS-SSIM vs ref | s/image |")
    assert "| teacher DDIM 50 | 50 | 7.5 | ref | 0.0000 |" in table
    printed, legend = table.split("\n\n", 1)  # the file holds the printed table, then its legend
    assert printed + "\n" in captured.out and "- PSNR vs ref (dB): PSNR vs teacher DDIM 50" in legend
    grid = Image.open(out / "grid.png")
    assert grid.width >= len(labels) * 64 and grid.height >= 2 * 64
    plot = Image.open(out / "quality.png")
    assert plot.width >= 600 and plot.height >= 400


def test_teacher_steps_and_samplers_pick_the_teacher_columns(tiny_sd, tiny_sd_lora, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", tiny_sd, "--lora", tiny_sd_lora, "--prompts", prompts, "--quick", "--out", out,
            "--no-progress", "--steps", "2", "--teacher-steps", "2,3", "--teacher-samplers", "dpm++"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    record = strict_json(out / "eval.json")
    assert [c["label"] for c in record["columns"]] == ["LCM-LoRA 2", "teacher DPM++ 2", "teacher DPM++ 3"]
    assert record["reference"] is None  # no DDIM 50 column: no agreement metrics, the rest as usual
    assert all("psnr" not in c and c["seconds_per_image"] > 0 for c in record["columns"])
    assert "PSNR" not in (out / "eval.md").read_text()


def test_tcd_columns_sample_the_same_model_from_the_same_noise(tiny_sd, tiny_sd_lora, tmp_path):
    """--lcm-samplers lcm,tcd: a TCD column per step count beside the LCM one, the same weights and initial
    noise, different images from 2 steps on (TCD's gamma changes where each step re-noises to)."""
    from lcmkit.infer.pipelines import initial_noise
    from lcmkit.measure.eval import EvalSettings, build_columns, sample_columns

    settings = EvalSettings(teacher=tiny_sd, prompts=["a red square", "a blue circle"], lora=tiny_sd_lora,
                            steps=[1, 2], teacher_steps=[2], teacher_samplers=("dpm++",),
                            lcm_samplers=("lcm", "tcd"), tcd_gamma=0.3, device="cpu")  # fmt: skip
    columns = build_columns(settings)
    assert [c.label for c in columns] == ["LCM-LoRA 1", "LCM-LoRA 2", "LCM-LoRA TCD 1", "LCM-LoRA TCD 2",
                                          "teacher DPM++ 2"]  # fmt: skip
    assert columns[0].pipe.unet is columns[2].pipe.unet  # one model, two samplers
    assert type(columns[2].pipe.scheduler).__name__ == "TCDScheduler" and columns[2].options == {"eta": 0.3}
    sample_columns(columns, settings.prompts, initial_noise(2, (4, 8, 8), 0), 0, 2, 64, progress=False)
    pixels = {c.label: np.stack([np.asarray(im, dtype=int) for im in c.images]) for c in columns}
    assert np.abs(pixels["LCM-LoRA 2"] - pixels["LCM-LoRA TCD 2"]).max() > 5
    assert np.abs(pixels["LCM-LoRA 1"] - pixels["LCM-LoRA TCD 1"]).max() <= 2  # one step: both return x0


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])
def test_initial_noise_is_the_noise_the_pipeline_draws_per_seed(tiny_sd, sampler):
    """Given latents give the images the pipeline draws itself, also for LCM, which draws fresh noise
    between steps (that noise must not repeat the initial noise)."""
    from lcmkit.families.teacher import ModelConfig, load_teacher
    from lcmkit.infer.pipelines import initial_noise, lcm_pipeline, run_batched, teacher_pipeline
    from lcmkit.infer.schedulers import teacher_scheduler

    teacher = load_teacher(ModelConfig(teacher=tiny_sd))
    if sampler == "lcm":
        pipe = lcm_pipeline(teacher, teacher.denoiser, 50)
    else:
        pipe = teacher_pipeline(teacher, teacher.denoiser, teacher_scheduler(teacher.scheduler.config, "ddim"))
    prompts = ["a red square", "a blue circle"]
    kw = dict(num_inference_steps=2, guidance_scale=3.0, height=64, width=64)
    drawn = run_batched(pipe, prompts, 11, 2, **kw)
    given = run_batched(pipe, prompts, 11, 1, latents=initial_noise(2, (4, 8, 8), 11), **kw)
    for a, b in zip(drawn, given):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    other = run_batched(pipe, prompts[:1], 11, 1, latents=initial_noise(1, (4, 8, 8), 12), **kw)[0]
    assert np.abs(np.asarray(other, dtype=int) - np.asarray(drawn[0], dtype=int)).max() > 1


def test_toy_prompts_add_the_probe_metrics(tmp_path, capsys):
    from test_toy_demo import make_toy_teacher

    teacher = make_toy_teacher(tmp_path / "toy-teacher")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", teacher, "--prompts", "toy", "--quick", "--num-images", "3", "--steps", "1",
            "--guidance", "5", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    record = strict_json(out / "eval.json")
    assert record["resolution"] == 32 and record["n_images"] == 3
    for c in record["columns"]:
        assert 0 <= c["prompt_accuracy"] <= 1 and c["probe_fd"] > 0 and "psnr" in c
    assert "| prompt accuracy | probe-FD |" in (out / "eval.md").read_text()


def make_tiny_clip(folder) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lcmkit.toy.tokenizer import load_toy_tokenizer

    tokenizer = load_toy_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_clip_score_from_a_local_folder_only(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LCMKIT_INCEPTION", raising=False)
    monkeypatch.setenv("LCMKIT_CLIP", make_tiny_clip(tmp_path / "clip"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", tiny_sd, "--prompts", str(prompts), "--quick", "--steps", "1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "CLIP score skipped" not in err and "FID skipped" in err
    record = strict_json(out / "eval.json")
    assert all(0 <= c["clip_score"] <= 100 for c in record["columns"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "{lora}", "--lcm", "{lora}"], "either --lora or --lcm"),
        (["--prompts", "{tmp}/missing.txt"], "missing.txt does not exist"),
        (["--steps", "0"], "--steps 0"),
        (["--steps", "2,-1"], "--steps 2,-1"),
        (["--num-images", "0"], "--num-images 0"),
        (["--teacher-steps", "4,x"], "--teacher-steps 4,x"),
        (["--teacher-samplers", "ddim,heun"], "--teacher-samplers ddim,heun"),
        (["--lcm-samplers", "lcm,heun"], "--lcm-samplers lcm,heun"),
        (["--lora", "{lora}", "--lcm-samplers", "euler"], "euler is a rectified-flow model's deterministic sampler"),
        (["--lcm-samplers", "tcd", "--tcd-gamma", "-0.1"], "--tcd-gamma -0.1"),
        (["--inception", "{tmp}/inception.pth"], "pickles are refused"),
        (["--clip-model", "{tmp}"], "not a transformers CLIP folder"),
        (["--teacher", "{tmp}/nothing"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_sd, tiny_sd_lora, tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    (tmp_path / "inception.pth").write_bytes(b"pickle")
    base = ["eval", "--teacher", tiny_sd, "--prompts", str(prompts), "--quick", "--out", str(tmp_path / "o"),
            "--no-progress"]  # fmt: skip
    extra = [e.format(lora=tiny_sd_lora, tmp=tmp_path) for e in extra]
    assert main(base + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o" / "eval.json").exists()


def test_fused_lora_pipeline_draws_what_the_adapter_draws(tiny_sd, tiny_sd_lora):
    from lcmkit.infer.generator import FewStepGenerator, distilled_pipeline
    from lcmkit.infer.pipelines import initial_noise, run_batched

    prompts, noise = ["a red square"], initial_noise(1, (4, 8, 8), 0)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=64, width=64, latents=noise)

    def draw(pipe) -> np.ndarray:
        return np.asarray(run_batched(pipe, prompts, 0, 1, **kw)[0], dtype=int)

    fused, name, w = distilled_pipeline(tiny_sd, tiny_sd_lora, None, None, "cpu", "fp32", guidance=7.5)
    assert name == "LCM-LoRA" and w == 1.0
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())  # unloaded after fusing
    adapter = draw(FewStepGenerator(base=tiny_sd, loras=[(tiny_sd_lora, 1.0)], device="cpu").pipe)
    base = draw(FewStepGenerator(base=tiny_sd, device="cpu").pipe)
    assert np.abs(draw(fused) - adapter).max() <= 2 and np.abs(base - adapter).max() > 5


def test_quick_eval_of_a_full_lcm(tiny_sd, tmp_path):
    from tiny_models import make_tiny_full_lcm

    lcm = make_tiny_full_lcm(tiny_sd, tmp_path / "full")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", tiny_sd, "--lcm", str(lcm), "--prompts", str(prompts), "--quick", "--steps", "1",
            "--guidance", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    cols = strict_json(out / "eval.json")["columns"]
    assert cols[0]["label"] == "LCM 1" and cols[0]["guidance"] == 4.0  # the teacher's w by default
    assert cols[0]["psnr"] > 0 and Image.open(out / "grid.png").height >= 64


def test_quality_bar_checks_the_three_criteria():
    from lcmkit.toy.demo import quality_bar

    def row(label, group, steps, fd, acc):
        return {"label": label, "group": group, "steps": steps, "probe_fd": fd, "prompt_accuracy": acc}

    teacher = [
        row("teacher DDIM 50", "teacher DDIM", 50, 2.0, 0.92),
        row("teacher DPM++ 4", "teacher DPM++", 4, 5.0, 0.6),
    ]
    good = quality_bar([row("LCM-LoRA 4", "LCM-LoRA", 4, 2.9, 0.85), *teacher])
    assert [line.split()[0] for line in good] == ["PASS", "PASS", "PASS"] and "2.90" in good[0] and "3.00" in good[0]
    bad = quality_bar([row("LCM-LoRA 4", "LCM-LoRA", 4, 5.5, 0.80), *teacher])
    assert [line.split()[0] for line in bad] == ["FAIL", "FAIL", "FAIL"] and "80.0%" in bad[2]
    assert quality_bar(teacher) == []  # no distilled model: nothing to judge
    only_dpm = quality_bar([row("LCM-LoRA 4", "LCM-LoRA", 4, 4.0, 0.85), teacher[1]])
    assert len(only_dpm) == 1 and only_dpm[0].startswith("PASS") and "DPM++ 4's 5.00" in only_dpm[0]
    two = quality_bar([row("LCM 2", "LCM", 2, 5.5, 0.9), row("LCM 4", "LCM", 4, 1.0, 0.9), *teacher], 2, 4)
    assert [line.split()[0] for line in two] == ["FAIL", "FAIL", "PASS"] and "LCM 2 probe-FD 5.50 <" in two[1]
    samplers = quality_bar([row("LCM-LoRA 4", "LCM-LoRA", 4, 5.5, 0.85), row("LCM-LoRA TCD 4", "LCM-LoRA TCD", 4,
                                                                             2.5, 0.85), *teacher])  # fmt: skip
    assert [line.split()[0] for line in samplers] == ["FAIL", "FAIL", "PASS", "PASS", "PASS", "PASS"]
    assert "LCM-LoRA TCD 4 probe-FD 2.50 <" in samplers[4]  # each distilled sampler judged on its own


def test_toy_lora_alias_names_what_is_missing(tmp_path, monkeypatch):
    import lcmkit.toy.demo as demo
    from lcmkit.errors import ConfigError

    monkeypatch.setattr(demo, "LORA_DIR", tmp_path / "absent")
    with pytest.raises(ConfigError, match="toy LCM-LoRA .*absent.* not in this build"):
        demo.toy_lora()


def test_quality_plot_draws_every_sampler_group(tmp_path, monkeypatch):
    """The demo has six groups (teacher, live and shipped model, each under LCM and TCD): each gets a line."""
    from matplotlib.figure import Figure

    from lcmkit.measure.eval import Column, quality_plot

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    groups = ["teacher DPM++", "LCM", "LCM TCD", "shipped LCM", "shipped TCD", "teacher DDIM"]
    columns = [Column(f"{g} {n}", g, None, n, 1.0, metrics={"probe_fd": 10.0 / n + i}) for i, g in enumerate(groups)
               for n in (2, 4)]  # fmt: skip
    for c in columns:
        c.seconds_per_image = 0.01 * c.steps
    quality_plot(columns, tmp_path / "q.png")
    legend = [t.get_text() for t in saved[0].axes[0].get_legend().get_texts()]
    assert legend == groups


def test_reports_keep_few_step_differences_visible_and_explain_themselves(tmp_path):
    from PIL import Image

    from lcmkit.infer.images import BACKGROUND, GUTTER, image_grid, save_images
    from lcmkit.measure.eval import _visible_range

    # the plot's y-range follows the 2-step and later points: a far worse 1-step point is drawn at the edge
    low, high = _visible_range([(1, 100.0), (2, 10.0), (4, 11.0), (8, 12.0)])
    assert 9.0 < low < 10.0 and 12.0 < high < 13.0
    # grid tiles are apart: the gutter between two white tiles is the grid's grey
    white = Image.new("RGB", (112, 112), "white")
    grid = image_grid([[white, Image.new("RGB", (112, 112), "red")]], ["a prompt"], ["one", "two"])
    y = 16 + GUTTER + 50
    assert grid.getpixel((GUTTER + 112 + GUTTER // 2, y)) == BACKGROUND != grid.getpixel((GUTTER + 50, y))
    assert grid.getpixel((2 * GUTTER + 112 + 50, y)) == (255, 0, 0)
    # a saved image says its real size
    folder = save_images([Image.new("RGB", (32, 48))], ["p"], tmp_path, 0, {"steps": 4, "scheduler": "lcm",
                                                                             "guidance": 1.0}, False)  # fmt: skip
    text = Image.open(folder / "0000-seed0.png").text
    assert "Size: 32x48" in text["parameters"] and json.loads(text["lcmkit"])["size"] == "32x48"
