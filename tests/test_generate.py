"""`lcmkit generate` and FewStepGenerator on the tiny teachers with a distilled LCM-LoRA / full LCM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcmkit.app.cli import main
from lcmkit.errors import ConfigError
from lcmkit.infer.generator import FewStepGenerator


def distill(teacher: str, shards: str, out, mode: str) -> str:
    args = ["distill", "--teacher", teacher, "--data", shards, "--out", str(out), "--mode", mode, "--max-steps", "3",
            "--batch-size", "2", "--resolution", "64", "--lora-rank", "4", "--learning-rate", "1e-3"]  # fmt: skip
    assert main(args + ["--no-progress"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def sd_lora(tiny_sd, shards, tmp_path_factory) -> str:
    return distill(tiny_sd, shards, tmp_path_factory.mktemp("lora"), "lora")


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, shards, tmp_path_factory) -> str:
    return distill(tiny_sdxl, shards, tmp_path_factory.mktemp("xl-lora"), "lora")


def arr(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_seeds_reproduce_images_in_any_batch(tiny_sd, sd_lora):
    gen = FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 1.0)])
    prompts = ["a red square", "a blue circle", "a green square"]
    one_by_one = gen(prompts, steps=2, seed=5, width=64, height=64, batch_size=1)
    batched = gen(prompts, steps=2, seed=5, width=64, height=64, batch_size=3)
    np.testing.assert_allclose(arr(one_by_one), arr(batched), atol=1.0)  # uint8 rounding at most
    assert np.abs(arr(gen(prompts[:1], steps=2, seed=6, width=64, height=64)) - arr(one_by_one[:1])).max() > 0


def test_adapter_weight_zero_is_the_base_image(tiny_sd, sd_lora):
    base = FewStepGenerator(base=tiny_sd)
    off = FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 0.0), (sd_lora, 0.0)])
    on = FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 1.0)])
    kw = dict(steps=4, seed=1, width=64, height=64)
    ref = arr(base(["a red square"], **kw))
    np.testing.assert_array_equal(arr(off(["a red square"], **kw)), ref)
    assert np.abs(arr(on(["a red square"], **kw)) - ref).max() > 0


def test_full_lcm_tcd_and_img2img(tiny_sd, shards, tmp_path):
    full = distill(tiny_sd, shards, tmp_path / "full", "full")
    gen = FewStepGenerator(lcm=full, scheduler="tcd")
    assert gen.default_guidance == 8.5
    img = gen(["a red square"], steps=2, width=64, height=64)[0]
    assert img.size == (64, 64)
    init = Image.new("RGB", (64, 64), (255, 0, 0))
    out = gen(["a red square"], steps=4, init_image=init, strength=0.5)[0]
    assert out.size == (64, 64)
    with pytest.raises(ConfigError, match="negative prompt"):
        gen(["x"], negative_prompt="blurry")
    # gamma: the generator's own (lcmkit serve --tcd-gamma) unless the call gives one; it changes the image
    kw = dict(steps=2, width=64, height=64, seed=3)
    deterministic = FewStepGenerator(lcm=full, scheduler="tcd", tcd_gamma=0.0)
    assert deterministic.tcd_gamma == 0.0
    np.testing.assert_array_equal(arr(deterministic(["a red square"], **kw)), arr(gen(["a red square"], tcd_gamma=0.0,
                                                                                    **kw)))  # fmt: skip
    assert np.abs(arr(deterministic(["a red square"], **kw)) - arr(gen(["a red square"], **kw))).max() > 5
    with pytest.raises(ConfigError, match="--tcd-gamma 2"):
        FewStepGenerator(lcm=full, scheduler="tcd", tcd_gamma=2)


def test_an_lcm_lora_samples_on_the_ddim_grid_it_was_distilled_on(tiny_sd, shards, sd_lora, tmp_path):
    """A LoRA distilled with N = 8 DDIM timesteps is trained at t = 124, 249, ..., 999 only: LCM and TCD sampling
    (generate, eval, serve, the fused export) must step on that grid, not on the default N = 50 one."""
    from diffusers import DiffusionPipeline

    from lcmkit.outputs.export import fuse_lora

    def timesteps(pipe) -> list[int]:
        pipe.scheduler.set_timesteps(4)
        return pipe.scheduler.timesteps.tolist()

    args = ["distill", "--teacher", tiny_sd, "--data", shards, "--out", str(tmp_path / "n8"), "--mode", "lora",
            "--max-steps", "1", "--batch-size", "2", "--resolution", "64", "--lora-rank", "4",
            "--num-ddim-timesteps", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    n8 = str(tmp_path / "n8")
    style = tmp_path / "style"  # a LoRA made elsewhere (no lcmkit metadata, no run record) says nothing of the grid
    style.mkdir()
    with safe_open(f"{sd_lora}/pytorch_lora_weights.safetensors", "pt") as f:
        plain = {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("lcmkit.")}
    weights = load_file(f"{sd_lora}/pytorch_lora_weights.safetensors")
    save_file(weights, style / "pytorch_lora_weights.safetensors", plain)
    alone = tmp_path / "alone"  # the file carries its grid in its own metadata, away from its run record
    alone.mkdir()
    shutil.copy(f"{n8}/pytorch_lora_weights.safetensors", alone / "lcm.safetensors")
    assert timesteps(FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 1.0)]).pipe) == [999, 759, 499, 259]
    for loras in ([(n8, 1.0)], [(f"{n8}/pytorch_lora_weights.safetensors", 1.0)], [(str(style), 0.5), (n8, 1.0)],
                  [(str(alone / "lcm.safetensors"), 1.0)]):  # fmt: skip
        gen = FewStepGenerator(base=tiny_sd, loras=loras, scheduler="tcd")
        assert timesteps(gen.pipe) == [999, 749, 499, 249], loras
    fused = fuse_lora(tiny_sd, n8, tmp_path / "fused")
    assert timesteps(DiffusionPipeline.from_pretrained(fused)) == [999, 749, 499, 249]


def test_full_lcm_as_a_single_file_generates_the_same_images(tiny_sd, shards, tmp_path, capsys):
    full = distill(tiny_sd, shards, tmp_path / "full", "full")
    single = tmp_path / "lcm.safetensors"
    assert main(["export", "single-file", f"{full}/pipeline", "--out", str(single), "--dtype", "fp32"]) == 0
    from_folder = FewStepGenerator(lcm=full)(["a red square"], steps=2, width=64, height=64)
    from_file = FewStepGenerator(lcm=str(single), base_config=tiny_sd)(["a red square"], steps=2, width=64, height=64)
    np.testing.assert_allclose(arr(from_file), arr(from_folder), atol=1.0)  # uint8 pixels
    capsys.readouterr()
    args = ["generate", "--lcm", str(single), "--prompt", "a red square", "--out", str(tmp_path / "png"),
            "--width", "64", "--height", "64"]  # fmt: skip
    assert main(args) == 2
    assert "pass --base-config" in capsys.readouterr().err
    assert main(args + ["--base-config", tiny_sd]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def test_cli_writes_pngs_with_parameters(tiny_sd, sd_lora, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "imgs"
    args = ["generate", "--base", tiny_sd, "--lora", f"{sd_lora}:0.8", "--prompts-file", str(prompts), "--steps", "2",
            "--width", "64", "--height", "64", "--seed", "10", "--out", str(out), "--negative-prompt", "blurry",
            "--guidance", "1.5"]  # fmt: skip
    assert main(args) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["0000-seed10.png", "0001-seed11.png"]
    info = Image.open(files[1]).text
    assert info["parameters"].startswith("a blue circle\nNegative prompt: blurry\nSteps: 2")
    record = json.loads(info["lcmkit"])
    assert record["seed"] == 11 and record["loras"] == [f"{sd_lora}:0.8"] and record["guidance"] == 1.5
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwrites silently


def test_refusals(tiny_sd, tiny_sdxl, sd_lora, sdxl_lora, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    unrelated = tmp_path / "other.safetensors"
    keys = {"unet.not_a_module.lora_A.weight": torch.zeros(4, 8), "unet.not_a_module.lora_B.weight": torch.zeros(8, 4)}
    save_file(keys, str(unrelated))
    base = [
        "generate",
        "--base",
        tiny_sd,
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o"),
        "--width",
        "64",
        "--height",
        "64",
    ]
    cases = [
        (["--lora", str(unrelated)], "matches no module"),
        (["--lora", sdxl_lora], "another"),
        (["--lora", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--steps", "-1"], "--steps -1"),
        (["--scheduler", "tcd", "--tcd-gamma", "1.5"], "--tcd-gamma 1.5"),
        (["--scheduler", "euler"], "sampler euler is a rectified-flow model's"),
        (["--image", __file__, "--strength", "1.5"], "not a readable image"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    assert main(base + ["--image", str(init), "--strength", "1.5"]) == 2
    assert "--strength 1.5" in capsys.readouterr().err
    # and the SD LoRA on the SDXL base
    assert (
        main(["generate", "--base", tiny_sdxl, "--lora", sd_lora, "--prompt", "x", "--out", str(tmp_path / "o2")]) == 2
    )
    assert "another" in capsys.readouterr().err


def test_kohya_loras_stack_and_are_checked(tiny_sd, tiny_sdxl, sd_lora, sdxl_lora, tmp_path, capsys):
    # Style LoRAs from model sites are kohya files: generate reads them through diffusers' converter.
    sd_kohya, xl_kohya = tmp_path / "sd_kohya.safetensors", tmp_path / "xl_kohya.safetensors"
    assert main(["export", "kohya", sd_lora, "--out", str(sd_kohya)]) == 0
    assert main(["export", "kohya", sdxl_lora, "--out", str(xl_kohya)]) == 0
    kw = dict(steps=2, seed=3, width=64, height=64)
    once = FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 1.0)])(["a red square"], **kw)
    as_kohya = FewStepGenerator(base=tiny_sd, loras=[(str(sd_kohya), 1.0)])(["a red square"], **kw)
    np.testing.assert_allclose(arr(as_kohya), arr(once), atol=1.0)
    capsys.readouterr()
    out = str(tmp_path / "o")
    assert main(["generate", "--base", tiny_sd, "--lora", sd_lora, "--lora", f"{xl_kohya}:0.8", "--prompt", "x",
                 "--out", out]) == 2  # fmt: skip
    assert "another family" in capsys.readouterr().err


def test_compiled_generation_matches_eager_with_loras_fused(tiny_sd, sd_lora):
    """--compile fuses the LoRAs (at their weights) and compiles: same images as eager, LoRA still applied."""
    kw = dict(steps=2, seed=3, width=64, height=64)
    eager = arr(FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 0.7)])(["a red square"], **kw))
    compiled_gen = FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 0.7)], compile=True)
    compiled = arr(compiled_gen(["a red square"], **kw))
    np.testing.assert_allclose(compiled, eager, atol=2.0)
    assert not compiled_gen.has_teacher  # the adapters are fused: no teacher view
    base = arr(FewStepGenerator(base=tiny_sd)(["a red square"], **kw))
    assert np.abs(compiled - base).max() > 2


def test_subpixel_upsample_equals_nearest_upsample_then_conv(tiny_sd):
    import copy

    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.upsampling import Upsample2D

    from lcmkit.infer.fast_vae import SubpixelUpsample, subpixel_vae_decoder

    torch.manual_seed(0)
    up = Upsample2D(8, use_conv=True, out_channels=6)
    fast = SubpixelUpsample(up)
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), up(x), rtol=0, atol=1e-5)
        odd = (11, 15)  # not 2x: the original module does it
        torch.testing.assert_close(fast(x, odd), up(x, odd), rtol=0, atol=0)
    assert not SubpixelUpsample.applies_to(Upsample2D(8, use_conv=True, kernel_size=5, padding=2))
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    swapped = copy.deepcopy(vae)
    assert subpixel_vae_decoder(swapped) == sum(len(b.upsamplers or []) for b in vae.decoder.up_blocks) > 0
    assert swapped.state_dict().keys() == vae.state_dict().keys()  # save_pretrained writes a loadable VAE
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a, b = vae.decode(z).sample, swapped.decode(z).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert FewStepGenerator(base=tiny_sd).subpixel_upsamplers > 0  # generate, serve and bench use it on a CPU


def test_a_lora_folder_without_weights_says_what_is_missing(tmp_path):
    from lcmkit.safe_load import lora_file

    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no pytorch_lora_weights.safetensors .it has no .safetensors file"):
        lora_file(empty)
    (empty / "style.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="it has style.safetensors: give that file instead"):
        lora_file(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        lora_file(tmp_path / "absent")


def test_a_size_the_vae_cannot_make_is_refused_before_any_work(tiny_sd, sd_lora):
    gen = FewStepGenerator(base=tiny_sd, loras=[(sd_lora, 1.0)])
    with pytest.raises(ConfigError, match="--width 33: must be a multiple of 8 for this model .*use 32 or 40"):
        gen(["a red square"], steps=1, width=33, height=64)
    with pytest.raises(ConfigError, match="--height 4: must be a multiple of 8"):
        gen(["a red square"], steps=1, width=64, height=4)
    assert gen(["a red square"], steps=1, width=64, height=40)[0].size == (64, 40)


def test_generate_refuses_to_overwrite_before_loading_anything(tmp_path, monkeypatch, capsys):
    import lcmkit.app.generate

    (tmp_path / "0000-seed0.png").write_bytes(b"an image the user kept")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(lcmkit.app.generate, "FewStepGenerator", no_model)
    assert main(["generate", "--base", "toy", "--prompt", "a red square", "--out", str(tmp_path)]) == 2
    assert "0000-seed0.png exists: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "0000-seed0.png").read_bytes() == b"an image the user kept"
