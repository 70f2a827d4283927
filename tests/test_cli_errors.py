"""Bad input ends with one clear line on stderr and exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lcmkit.app.cli import main
from lcmkit.distill.config import load_config, validate
from lcmkit.errors import ConfigError


def run(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def base(teacher: str, data: str, out: Path) -> list[str]:
    return ["distill", "--teacher", teacher, "--data", data, "--out", str(out), "--max-steps", "1",
            "--batch-size", "1", "--resolution", "64", "--lora-rank", "2", "--no-progress"]  # fmt: skip


def test_missing_teacher(capsys, shards, tmp_path):
    code, err = run(capsys, *base(str(tmp_path / "nope"), shards, tmp_path / "o"))
    assert code == 2 and "nope" in err and "does not exist" in err and len(err.splitlines()) == 1


def test_non_diffusion_teacher(capsys, shards, tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hi")
    code, err = run(capsys, *base(str(tmp_path / "notamodel"), shards, tmp_path / "o"))
    assert code == 2 and "not a diffusers pipeline folder" in err and len(err.splitlines()) == 1


def test_pickle_teacher_refused(capsys, shards, tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"not really")
    code, err = run(capsys, *base(str(f), shards, tmp_path / "o"))
    assert code == 2 and "pickle" in err


def test_w_min_above_w_max(capsys, tiny_sd, shards, tmp_path):
    code, err = run(capsys, *base(tiny_sd, shards, tmp_path / "o"), "--w-min", "9", "--w-max", "3")
    assert code == 2 and "--w-min 9.0" in err and "--w-max 3.0" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("spec", ["", "{missing}/{00000..00003}.tar", "*.nothing"])
def test_empty_or_missing_data(capsys, tiny_sd, tmp_path, spec):
    data = spec.replace("{missing}", str(tmp_path / "missing")) if spec else " "
    if spec.startswith("*"):
        data = str(tmp_path / spec)
    code, err = run(capsys, *base(tiny_sd, data, tmp_path / "o"))
    assert code == 2 and "--data" in err and len(err.splitlines()) == 1


def test_unreadable_data_names_the_source(capsys, tiny_sd, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    code, err = run(capsys, *base(tiny_sd, str(bad), tmp_path / "o"))
    assert code == 2 and "bad.tar" in err and "no usable sample" in err


def test_finished_out_is_refused_and_kept(capsys, tiny_sd, shards, tmp_path):
    out = tmp_path / "run"
    assert main(base(tiny_sd, shards, out)) == 0
    capsys.readouterr()
    weights = (out / "pytorch_lora_weights.safetensors").read_bytes()
    code, err = run(capsys, *base(tiny_sd, shards, out))
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == weights
    # a typo in the teacher with --overwrite must not cost the previous run
    code, err = run(capsys, *base(str(tmp_path / "typo"), shards, out), "--overwrite")
    assert code == 2 and (out / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert main(base(tiny_sd, shards, out) + ["--overwrite"]) == 0


def test_bad_config_values_name_the_option(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[lcd]\nw_min = "three"\n')
    with pytest.raises(ConfigError, match="w_min"):
        load_config(str(cfg_file))
    cfg_file.write_text("[lcd]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(str(cfg_file))
    cfg = load_config(None, {"teacher": "x", "data": "y", "out": "z", "loss": "l1"})
    with pytest.raises(ConfigError, match="--loss 'l1'"):
        validate(cfg)
    cfg = load_config(None, {"teacher": "x", "data": "y", "out": "z", "adversarial_real": "teacher"})
    with pytest.raises(ConfigError, match="--adversarial-real 'teacher': choose data or target"):
        validate(cfg)
    cfg = load_config(None, {"teacher": "x", "data": "y", "out": "z", "discriminator_lr": 0.0})
    with pytest.raises(ConfigError, match="--discriminator-lr > 0"):
        validate(cfg)


def test_flags_override_the_config_file(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('mode = "full"\n[lcd]\nw_min = 2.0\nw_max = 8.0\n[lora]\nlora_rank = 16\n')
    cfg = load_config(str(cfg_file), {"w_max": 10.0, "lora_rank": None})
    assert (cfg.mode, cfg.lcd.w_min, cfg.lcd.w_max, cfg.lora.lora_rank) == ("full", 2.0, 10.0, 16)


def test_no_traceback_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lcmkit", "distill", "--teacher", str(tmp_path / "x"), "--data", "a.tar", "--out",
         str(tmp_path / "o")], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("lcmkit: error:")


def test_8bit_adam_without_bitsandbytes(capsys, tiny_sd, shards, tmp_path):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    code, err = run(capsys, *base(tiny_sd, shards, tmp_path / "o"), "--use-8bit-adam")
    assert code == 2 and "bitsandbytes" in err and not (tmp_path / "o").exists()


def test_processes_that_accelerate_did_not_join_are_refused(capsys, tiny_sd, shards, tmp_path, monkeypatch):
    # `accelerate launch --multi_gpu` where no GPU is visible: WORLD_SIZE=2, yet every process trains alone.
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    code, err = run(capsys, *base(tiny_sd, shards, tmp_path / "o"))
    assert (
        code == 2
        and "started as one of 2 processes" in err
        and "ACCELERATE_USE_CPU" in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "o").exists()


def test_every_distill_flag_is_explained_in_help(capsys):
    from lcmkit.distill.config import _section_fields

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in _section_fields():
        flag = "--" + name.replace("_", "-")
        entry = text.split(f" {flag} ", 1)[-1].split(" --", 1)[0]  # the flag's help text, up to the next flag
        words = [w for w in entry.split() if w not in ("STR", "INT", "FLOAT")]
        assert words and not words[0].startswith("["), f"{flag} has no description"
    assert "--teacher-precision STR Storage of the frozen teacher UNet" in text
    assert "[train; default auto]" in text


def test_every_numeric_flag_takes_a_negative_value_to_its_validator():
    """`--learning-rate -1e-4` used to print the usage and 'expected one argument': argparse takes -1e-4 for an
    option. Every numeric flag of every command now parses a negative value, so the validator can name it."""
    from test_cli_flags import leaves, minimal_argv

    from lcmkit.app.cli import build_parser, join_negative_numbers

    checked = 0
    for command, parser in leaves(build_parser()).items():
        for action in parser._actions:
            if not action.option_strings or action.type not in (int, float) or action.nargs not in (None, "?"):
                continue
            value = "-1e-4" if action.type is float else "-3"
            argv = [*minimal_argv(parser), action.option_strings[-1], value]
            args = parser.parse_args(join_negative_numbers(argv))
            assert getattr(args, action.dest) == action.type(value), f"{command} {action.option_strings[-1]}"
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("argv, message", [
    (["distill", "--teacher", "toy", "--data", "x", "--out", "o", "--learning-rate", "-1e-4"],
     "--learning-rate -0.0001: must be > 0"),
    (["distill", "--teacher", "toy", "--data", "x", "--out", "o", "--w-min", "-2"], "--w-min -2.0 is negative"),
])  # fmt: skip
def test_a_negative_value_gets_its_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_version(capsys):
    import lcmkit

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"lcmkit {lcmkit.__version__}"


MISSING = "/nonexistent/lcmkit-test-path"


@pytest.mark.parametrize("argv", [
    ["distill", "--teacher", MISSING, "--data", MISSING, "--out", "OUT"],
    ["distill", "--teacher", "toy", "--data", MISSING, "--out", "OUT"],
    ["cache", "--teacher", MISSING, "--data", MISSING, "--out", "OUT"],
    ["generate", "--base", MISSING, "--prompt", "a", "--out", "OUT"],
    ["generate", "--base", "toy", "--lora", MISSING, "--prompt", "a", "--out", "OUT"],
    ["generate", "--lcm", MISSING, "--prompt", "a", "--out", "OUT"],
    ["export", "single-file", MISSING, "--out", "OUT/x.safetensors"],
    ["export", "kohya", MISSING, "--out", "OUT/x.safetensors"],
    ["export", "fused", MISSING, "--base", "toy", "--out", "OUT"],
    ["export", "diffusers", MISSING, "--base", "toy", "--out", "OUT"],
    ["info", MISSING],
    ["eval", "--teacher", MISSING, "--prompts", "toy", "--out", "OUT"],
    ["eval", "--teacher", "toy", "--prompts", MISSING, "--out", "OUT"],
    ["bench", "generate", "--teacher", MISSING],
    ["push", MISSING, "--repo-id", "me/x"],
    ["serve", "--base", MISSING, "--lora", "toy"],
    ["demo", "--teacher", MISSING, "--out", "OUT"],
    ["toy", "ship-teacher", "--run", MISSING, "--out", "OUT"],
])  # fmt: skip
def test_every_command_says_one_line_for_a_missing_path(argv, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcmkit: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
