"""SD3/SD3.5 and FLUX.1 on tiny real-architecture teachers: lcmkit's conditioning and denoiser call agree with the
diffusers pipelines; distilled LoRAs load in StableDiffusion3Pipeline / FluxPipeline and change the few-step image;
full students are ready pipeline folders; a resumed run retraces the same losses; bad teachers get one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distill_e2e import distill_args, losses, run_cli

from lcmkit.families.flux import pack, unpack
from lcmkit.families.teacher import ModelConfig, load_teacher

FAMILIES = ["sd3", "flux"]


@pytest.fixture(scope="module")
def teachers(tiny_sd3, tiny_flux) -> dict[str, str]:
    return {"sd3": tiny_sd3, "flux": tiny_flux}


def pipeline(path: str, lcm_scheduler: bool = True):
    from diffusers import DiffusionPipeline, FlowMatchLCMScheduler

    pipe = DiffusionPipeline.from_pretrained(path)
    if lcm_scheduler:
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    return pipe.set_progress_bar_config(disable=True) or pipe


def sample(pipe, steps: int = 4, guidance: float = 1.0, seed: int = 0) -> np.ndarray:
    """FlowMatchLCMScheduler draws its re-noising from torch's global generator (the pipelines pass it none)."""
    torch.manual_seed(seed)
    out = pipe("a red square", num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np")  # fmt: skip
    return out.images


@pytest.mark.parametrize("name", FAMILIES)
def test_text_conditioning_matches_the_pipeline(teachers, name):
    teacher = load_teacher(ModelConfig(teacher=teachers[name]))
    pipe = pipeline(teachers[name], lcm_scheduler=False)
    prompts = ["a red square on a blue background", "a cat"]
    cond = teacher.conditioner().encode(prompts)
    if name == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    else:
        hidden, pooled, _ = pipe.encode_prompt(prompts, prompts)
    torch.testing.assert_close(cond.hidden_states, hidden, rtol=1e-4, atol=1e-4)  # same layout, same encoders
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_denoiser_call_matches_the_pipeline(teachers, name):
    """One Euler step from pure noise (sigma 1 -> 0) through the pipeline equals z - v from lcmkit's call."""
    teacher = load_teacher(ModelConfig(teacher=teachers[name]))
    pipe = pipeline(teachers[name], lcm_scheduler=False)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    guidance = 3.0 if name == "flux" else 1.0
    latents = pack(noise) if name == "flux" else noise
    out = pipe("a red square", num_inference_steps=1, guidance_scale=guidance, height=64, width=64, latents=latents,
               output_type="latent").images  # fmt: skip
    if name == "flux":
        out = unpack(out, 8, 8)
    cond = teacher.conditioner().encode(["a red square"])
    with torch.no_grad():
        v = teacher.family.call(teacher.denoiser, noise, torch.ones(1), cond, torch.tensor([guidance - 1.0]), None)
    torch.testing.assert_close(out, noise - v, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_runs(teachers, shards, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for name, teacher in teachers.items():
        out = tmp_path_factory.mktemp(f"{name}-lora")
        assert run_cli(*distill_args(teacher, shards, out, "lora", "--learning-rate", "1e-2", "--overwrite")) == 0
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_loads_in_the_diffusers_pipeline_and_changes_the_image(teachers, lora_runs, name):
    out = lora_runs[name]
    pipe = pipeline(teachers[name])
    guidance = 3.0 if name == "flux" else 1.0  # FLUX: the guidance input; SD3: no CFG pass with an LCM-LoRA
    before = sample(pipe, guidance=guidance)
    assert np.array_equal(before, sample(pipe, guidance=guidance))  # seeded: only the LoRA can change it
    pipe.load_lora_weights(str(out))
    after = sample(pipe, guidance=guidance)
    assert np.abs(after - before).max() > 1e-3
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["family"] == name and record["mode"] == "lora"
    assert all(np.isfinite(list(losses(out).values())))


@pytest.mark.parametrize("name", FAMILIES)
def test_full_student_is_a_ready_pipeline(teachers, shards, tmp_path, name):
    extra = ["--w-min", "3", "--w-max", "3"] if name == "sd3" else []
    out = tmp_path / "full"
    assert run_cli(*distill_args(teachers[name], shards, out, "full", *extra)) == 0
    assert (out / "transformer" / "config.json").is_file() and (out / "transformer_online").is_dir()
    pipe = pipeline(str(out / "pipeline"), lcm_scheduler=False)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    images = sample(pipe, steps=2, guidance=4.0 if name == "flux" else 1.0)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_resume_retraces_the_uninterrupted_run(teachers, shards, tmp_path, name):
    common = ["--checkpoint-every", "4", "--seed", "3", "--max-steps", "8"]
    whole, stopped = tmp_path / "a", tmp_path / "b"
    assert run_cli(*distill_args(teachers[name], shards, whole, "lora", *common)) == 0
    assert run_cli(*distill_args(teachers[name], shards, stopped, "lora", *common[:-1], "5")) == 0
    (stopped / "lcmkit_run.json").unlink()
    assert run_cli(*distill_args(teachers[name], shards, stopped, "lora", *common, "--resume", "latest")) == 0
    a, b = losses(whole), losses(stopped)
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == a[step], step


def one_line_error(capsys, *args: str) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_flux_folder_without_t5_is_refused(tiny_flux, shards, tmp_path, capsys):
    broken = tmp_path / "flux-no-t5"
    shutil.copytree(tiny_flux, broken)
    shutil.rmtree(broken / "text_encoder_2")
    err = one_line_error(capsys, *distill_args(str(broken), shards, tmp_path / "o", "lora"))
    assert "text_encoder_2 (T5)" in err and str(broken) in err


def test_schnell_teacher_is_refused(shards, tmp_path, capsys):
    from tiny_models import make_tiny_flux

    schnell = make_tiny_flux(tmp_path / "schnell", schnell=True)
    err = one_line_error(capsys, *distill_args(str(schnell), shards, tmp_path / "o", "lora"))
    assert "schnell" in err and "FLUX.1-dev" in err
    assert not (tmp_path / "o").exists()


def test_sd3_full_student_with_a_w_range_is_refused(tiny_sd3, shards, tmp_path, capsys):
    err = one_line_error(capsys, *distill_args(tiny_sd3, shards, tmp_path / "o", "full", "--w-min", "2"))
    assert "--w-min" in err and "--mode lora" in err and "[2, 6]" in err


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_the_lora_and_the_full_student(teachers, lora_runs, tmp_path, name):
    from lcmkit.infer.generator import FewStepGenerator

    gen = FewStepGenerator(teachers[name], [(str(lora_runs[name]), 1.0)])
    assert type(gen.pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    assert gen.default_guidance == (3.5 if name == "flux" else 1.0)  # FLUX: its guidance input; SD3: no CFG pass
    a = gen(["a red square", "a cat"], steps=4, width=64, height=64)
    b = gen(["a red square", "a cat"], steps=4, width=64, height=64)
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in b]  # seeded, also the re-noising
    teacher = gen.teacher(["a red square"], steps=3, guidance=3.0, width=64, height=64, sampler="euler")
    assert np.abs(np.asarray(teacher[0], float) - np.asarray(a[0], float)).max() > 0
    err = "--scheduler tcd: diffusers has no TCD scheduler for a rectified-flow model (SD3, FLUX)"
    with pytest.raises(Exception, match=err.replace("(", r"\(").replace(")", r"\)")):
        FewStepGenerator(teachers[name], [(str(lora_runs[name]), 1.0)], scheduler="tcd")


@pytest.mark.parametrize("name", FAMILIES)
def test_euler_sampler_steps_deterministically_on_the_training_grid(teachers, lora_runs, name):
    """--scheduler euler: a flow student's deterministic sampler (flow TCD at gamma 0, PCM's own) is diffusers'
    FlowMatchEulerDiscreteScheduler on the student's training grid: for 4 steps on N = 50, the sigmas the
    TCDScheduler of a UNet visits, (999, 759, 499, 259 + 1) / 1000, under the teacher's shift; no re-noising, so
    the image does not depend on torch's global generator; it is not the LCM sampler's image."""
    from lcmkit.core.flow import shift_sigmas
    from lcmkit.infer.generator import FewStepGenerator

    gen = FewStepGenerator(teachers[name], [(str(lora_runs[name]), 1.0)], scheduler="euler")
    assert type(gen.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    torch.manual_seed(0)
    a = gen(["a red square"], steps=4, width=64, height=64)
    sigmas = gen.pipe.scheduler.sigmas
    torch.manual_seed(123)
    b = gen(["a red square"], steps=4, width=64, height=64)
    assert np.asarray(a[0]).tolist() == np.asarray(b[0]).tolist()
    if name == "sd3":  # FLUX shifts by resolution (dynamic shifting); SD3 by its config's shift
        expected = shift_sigmas(torch.tensor([1.0, 0.76, 0.5, 0.26]), gen.pipe.scheduler.config.shift)
        torch.testing.assert_close(sigmas[:-1].float(), expected.float())
        assert float(sigmas[-1]) == 0.0
    gen.set_scheduler("lcm")
    lcm = gen(["a red square"], steps=4, width=64, height=64)
    assert np.abs(np.asarray(lcm[0], float) - np.asarray(a[0], float)).max() > 0


def test_flux_cache_trains_as_the_raw_images(tiny_flux, tmp_path):
    """T5 encoding dominates a FLUX step: the cache holds the embeddings; training from an fp32 cache retraces the
    run from raw images."""
    from test_data import make_folder

    data, cache = f"folder:{make_folder(tmp_path / 'f', 'jsonl')}", tmp_path / "cache"
    assert run_cli("cache", "--teacher", tiny_flux, "--data", data, "--resolution", "64", "--out", str(cache),
                   "--dtype", "fp32", "--shard-size", "1", "--no-progress") == 0  # fmt: skip
    raw, cached = tmp_path / "raw", tmp_path / "cached"
    assert run_cli(*distill_args(tiny_flux, data, raw, "lora", "--max-steps", "3")) == 0
    assert run_cli(*distill_args(tiny_flux, f"cache:{cache}", cached, "lora", "--max-steps", "3")) == 0
    record = json.loads((cached / "lcmkit_run.json").read_text())
    assert record["data"]["released"] == ["vae.encoder", "text_encoders"]
    a, b = losses(raw), losses(cached)
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step


@pytest.mark.parametrize("name", FAMILIES)
def test_comfyui_export_keeps_the_weights_and_adds_alphas(teachers, lora_runs, tmp_path, name):
    """ComfyUI maps diffusers `transformer.` lora_A/lora_B keys of SD3 and FLUX itself and reads `<module>.alpha`
    for the scale: the export is the same tensors plus one alpha per module (a FLUX one still loads in diffusers,
    with the same image)."""
    from safetensors.torch import load_file

    src = lora_runs[name] / "pytorch_lora_weights.safetensors"
    dst = tmp_path / "comfy.safetensors"
    assert run_cli("export", "kohya", str(src), "--out", str(dst)) == 0
    original, exported = load_file(src), load_file(dst)
    alphas = {k: v for k, v in exported.items() if k.endswith(".alpha")}
    assert {k: v for k, v in exported.items() if k not in alphas}.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    modules = {k.removesuffix(".lora_A.weight") for k in original if k.endswith(".lora_A.weight")}
    assert {k.removesuffix(".alpha") for k in alphas} == modules
    assert {float(v) for v in alphas.values()} == {4.0}  # alpha = rank 4: scale 1, as diffusers applies it
    if name != "flux":  # diffusers reads `.alpha` keys for FLUX LoRAs only (SD3: the file is for ComfyUI)
        return
    pipe = pipeline(teachers[name])
    guidance = 3.0 if name == "flux" else 1.0
    pipe.load_lora_weights(str(src.parent))
    a = sample(pipe, guidance=guidance)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(dst.parent), weight_name=dst.name)
    np.testing.assert_allclose(sample(pipe, guidance=guidance), a, atol=1e-5)


def test_fused_flux_pipeline_gives_the_lora_image(tiny_flux, lora_runs, tmp_path):
    assert run_cli("export", "fused", str(lora_runs["flux"]), "--base", tiny_flux, "--out", str(tmp_path / "f")) == 0
    fused = pipeline(str(tmp_path / "f"), lcm_scheduler=False)
    assert type(fused.scheduler).__name__ == "FlowMatchLCMScheduler"
    pipe = pipeline(tiny_flux)
    pipe.load_lora_weights(str(lora_runs["flux"]))
    np.testing.assert_allclose(sample(fused, guidance=3.0), sample(pipe, guidance=3.0), atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_single_file_transformer_with_teacher_config(teachers, shards, tmp_path, capsys, name):
    """A transformer as one .safetensors file (diffusers reads the original and its own layout; the tiny test file is
    in diffusers' layout: diffusers' converter of the original layout assumes full-size widths) plus
    --teacher-config for the rest: the same run as from the folder."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    net = DiffusionPipeline.from_pretrained(teachers[name]).transformer
    single = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, single)
    capsys.readouterr()
    err = one_line_error(capsys, *distill_args(str(single), shards, tmp_path / "x", "lora"))
    assert "--teacher-config" in err and "single" in err
    folder, file = tmp_path / "folder", tmp_path / "file"
    assert run_cli(*distill_args(teachers[name], shards, folder, "lora", "--max-steps", "3")) == 0
    assert run_cli(*distill_args(str(single), shards, file, "lora", "--max-steps", "3", "--teacher-config",
                                 teachers[name])) == 0  # fmt: skip
    assert losses(file) == losses(folder)
    assert json.loads((file / "lcmkit_run.json").read_text())["family"] == name


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_and_bench_take_flow_models(teachers, lora_runs, tmp_path, capsys, name):
    """The reference of a flow teacher is its own Euler at 50 steps; guidance defaults are the family's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    out = tmp_path / "eval"
    assert run_cli("eval", "--teacher", teachers[name], "--lora", str(lora_runs[name]), "--prompts", str(prompts),
                   "--resolution", "64", "--quick", "--out", str(out), "--no-progress", "--lcm-samplers",
                   "lcm,euler") == 0  # fmt: skip
    record = json.loads((out / "eval.json").read_text())
    assert record["reference"] == "teacher Euler 50"
    guidance = {row["group"]: row["guidance"] for row in record["columns"]}
    student, teacher = (3.5, 3.5) if name == "flux" else (1.0, 7.0)
    assert guidance == {"LCM-LoRA": student, "LCM-LoRA Euler": student, "teacher Euler": teacher,
                        "teacher DPM++": teacher}  # fmt: skip
    capsys.readouterr()
    assert run_cli("bench", "generate", "--teacher", teachers[name], "--lora", str(lora_runs[name]), "--resolution",
                   "64", "--repeats", "1", "--warmup", "0") == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| LCM-LoRA (lcmkit) | lcm | 4 |" in table and "| teacher | dpm++ | 25 |" in table


def test_serve_answers_with_a_flux_lora(tiny_flux, lora_runs):
    """lcmkit serve over a FLUX base + LCM-LoRA: the few-step image and the teacher's, both PNGs, and they differ."""
    import threading
    import time

    import uvicorn
    from test_serve import free_port, pixels, post

    from lcmkit.app.server import create_app
    from lcmkit.infer.generator import FewStepGenerator

    app = create_app(FewStepGenerator(tiny_flux, [(str(lora_runs["flux"]), 1.0)]))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "a red square", "seed": 3, "steps": 2, "width": 64, "height": 64}
        status, png, headers = post(url, body)
        assert status == 200 and headers["content-type"] == "image/png"
        status, teacher_png, _ = post(url, {**body, "model": "teacher", "teacher_steps": 4})
        assert status == 200 and np.abs(pixels(teacher_png).astype(int) - pixels(png)).max() > 0
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_init_lora_from_a_flux_lora(tiny_flux, lora_runs, shards, tmp_path):
    """SD3's and FLUX's LoRA loaders return (state, metadata), the UNet families' (state, alphas, metadata): a FLUX
    LCM-LoRA starts a new run exactly as it is."""
    from safetensors.torch import load_file

    source = lora_runs["flux"] / "pytorch_lora_weights.safetensors"
    out = tmp_path / "out"
    assert run_cli(*distill_args(tiny_flux, shards, out, "lora", "--max-steps", "1", "--learning-rate", "1e-12",
                                 "--init-lora", str(source))) == 0  # fmt: skip
    a, b = load_file(source), load_file(out / "pytorch_lora_weights.safetensors")
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-9


def test_info_names_the_transformer_lora_targets():
    from lcmkit.formats.info import target_name

    assert target_name("transformer_blocks.0.ff_context.net.0.proj") == "ff_context.net.0.proj"
    assert target_name("transformer_blocks.0.ff_context.net.2") == "ff_context.net.2"
    assert target_name("single_transformer_blocks.0.proj_mlp") == "proj_mlp"
    assert target_name("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj") == "ff.net.0.proj"
