"""Shipped presets: they load and validate, sit under the config file and the flags, and fit the family."""

from __future__ import annotations

import json

import pytest

from lcmkit.app.cli import main
from lcmkit.distill.config import list_presets, load_config, validate
from lcmkit.errors import ConfigError

REQUIRED = {"teacher": "some/teacher", "data": "/data/{0..1}.tar", "out": "/tmp/out"}


@pytest.mark.parametrize(
    "name", ["sd15-lora", "sd15-full", "sd21-lora", "sdxl-lora", "sdxl-full", "sd35-medium-lora", "sd35-large-lora",
             "flux-dev-lora"]
)  # fmt: skip
def test_every_preset_loads_and_validates(name):
    info = list_presets()[name]
    cfg = validate(load_config(None, {"preset": name, **REQUIRED}))
    assert cfg.preset == name and cfg.mode == info["mode"] and info["family"] in ("sd", "sdxl", "sd3", "flux")
    assert cfg.lcd.loss == "huber" and cfg.lcd.huber_c == 0.001 and cfg.lcd.num_ddim_timesteps == 50
    sizes = {"sd15": 512, "sd21": 768, "sdxl": 1024, "sd35": 1024, "flux": 1024}
    assert cfg.data.resolution == sizes[name.split("-")[0]]
    if info["family"] in ("sd3", "flux"):  # one 80 GB GPU: bf16 base, gradient checkpointing, the family's w range
        from lcmkit.families import get_family

        assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing and cfg.mode == "lora"
        assert (cfg.lcd.w_min, cfg.lcd.w_max) == get_family(info["family"]).guidance_range
        return
    if info["family"] == "sdxl":
        assert cfg.model.vae == "madebyollin/sdxl-vae-fp16-fix" and cfg.lcd.w_min == 3.0
    assert cfg.optim.learning_rate == (1e-4 if cfg.mode == "lora" else 1e-6)


def test_config_file_and_flags_override_the_preset(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('preset = "sd15-lora"\n[optim]\nlearning_rate = 5e-5\n[lora]\nlora_rank = 16\n')
    cfg = load_config(str(file), REQUIRED)
    assert (cfg.optim.learning_rate, cfg.lora.lora_rank, cfg.lcd.w_min) == (5e-5, 16, 5.0)
    cfg = load_config(str(file), {**REQUIRED, "learning_rate": 2e-5, "preset": "sdxl-lora"})
    assert (cfg.optim.learning_rate, cfg.lora.lora_rank, cfg.lcd.w_min) == (2e-5, 16, 3.0)
    with pytest.raises(ConfigError, match="no such preset .*sd15-lora"):
        load_config(None, {"preset": "sd3-lora"})


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in list_presets())
    assert main(["presets", "sdxl-full"]) == 0
    assert 'mode = "full"' in capsys.readouterr().out
    assert main(["presets", "nope"]) == 2


def test_preset_runs_and_refuses_the_wrong_family(tiny_sd, tiny_sdxl, shards, tmp_path, capsys):
    small = ["--data", shards, "--resolution", "64", "--batch-size", "2", "--max-steps", "1", "--mixed-precision", "no",
             "--no-gradient-checkpointing", "--no-progress"]  # fmt: skip
    out = tmp_path / "sd"
    assert main(["distill", "--preset", "sd15-lora", "--teacher", tiny_sd, "--out", str(out), *small]) == 0
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["config"]["preset"] == "sd15-lora" and record["config"]["lora"]["lora_rank"] == 64
    xl = ["distill", "--preset", "sdxl-lora", "--teacher", tiny_sdxl, "--vae", f"{tiny_sdxl}/vae", "--lora-rank", "4"]
    assert main([*xl, "--out", str(tmp_path / "xl"), *small]) == 0
    capsys.readouterr()
    assert main(["distill", "--preset", "sdxl-lora", "--teacher", tiny_sd, "--out", str(tmp_path / "x"), *small]) == 2
    err = capsys.readouterr().err
    assert "--preset sdxl-lora is for SDXL teachers" in err and "use one of sd15-full, sd15-lora, sd21-lora" in err
    assert not (tmp_path / "x").exists()


def test_a_wrong_family_preset_is_reported_before_what_the_preset_needs(tiny_sd, shards, tmp_path, capsys):
    """The SDXL preset asks for fp16 (CUDA only): on a CPU with an SD teacher the family mismatch is what to fix."""
    args = ["distill", "--preset", "sdxl-lora", "--teacher", tiny_sd, "--data", shards, "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--preset sdxl-lora is for SDXL teachers" in err and "fp16" not in err
