"""Two processes on CPU (gloo) through accelerate launch: the trainer's gradient averaging, agreement on skipped
non-finite steps and main-process-only writes are exact; `lcmkit distill` runs end to end, writing once.

accelerate 1.x starts CPU processes with torchrun only under --multi_gpu (its --cpu flag alone runs a single process
unless MPI is set up), and ACCELERATE_USE_CPU=1 makes them use gloo on the CPU: that is the launch used here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_kill_resume import lcmkit_env

from lcmkit.app.cli import main
from lcmkit.train.loop import NAN_HOOK

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], fsdp: bool = False, **env: str) -> subprocess.CompletedProcess:
    try:
        import accelerate  # noqa: F401
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_gloo_available():
            pytest.skip("torch has no gloo backend here")
    except ImportError:
        pytest.skip("accelerate is not installed")
    how = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *how,
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(command, env=lcmkit_env(ACCELERATE_USE_CPU="1", **env), capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def test_two_processes_average_gradients_and_agree_on_skipped_steps(monkeypatch, tmp_path):
    """Exact: 2 processes, each its own batches (NaN on process 1 only at step 2) == 1 process accumulating the
    two processes' batches (NaN at step 2)."""
    import ddp_trainer_probe as probe

    proc = launch([str(TESTS / "ddp_trainer_probe.py"), str(tmp_path / "ddp")], **{NAN_HOOK: "2@1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(tmp_path / "ddp" / "weights.safetensors")
    assert (tmp_path / "ddp" / "rank1-done").is_file()
    # only the main process wrote checkpoints (none after the skipped step 2) and the log, once per step
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["checkpoint-00000004", "latest"]
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "ddp" / "logs" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]

    monkeypatch.setenv(NAN_HOOK, "2")
    single = probe.train(tmp_path / "single", 2, probe.Batches(lambda: probe.interleaved(2)))
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=1e-5)


def test_distill_under_accelerate_launch_writes_once(tiny_sd, shards, tmp_path, capsys):
    """`lcmkit distill` with 2 processes x batch 1 against 1 process x batch 2 (the same global batch and seed).

    The weights cannot match exactly: each process reads its own part of the stream (process r takes shard r)
    and draws its own LCD noise, timesteps and guidance scales (seed * 1000 + r), so the two runs see different
    samples and noise. What must hold: the same start (LoRA init from the seed), the same number of optimizer
    steps at the same learning rate: Adam moves each weight by at most about lr per step (|m / sqrt(v)| <= ~1),
    so after N steps every weight is within 2 N lr of the other run's; a run that trained 2N steps, scaled the
    learning rate by the number of processes or initialised the processes differently breaks the bound."""
    steps, lr = 4, 1e-3

    def args(out: Path, batch: int) -> list[str]:
        return ["distill", "--teacher", tiny_sd, "--data", shards, "--out", str(out), "--max-steps", str(steps),
                "--batch-size", str(batch), "--resolution", "64", "--lora-rank", "4", "--learning-rate", str(lr),
                "--checkpoint-every", "2", "--log-every", "1", "--shuffle-buffer", "4", "--no-progress",
                "--validation-prompts", "a red square", "--validation-steps", "1"]  # fmt: skip

    proc = launch(["-m", "lcmkit", *args(tmp_path / "two", 1)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "two"
    assert proc.stdout.count("distillation finished") == 1, proc.stdout
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["num_processes"] == 2 and record["steps"] == steps and record["nonfinite_steps"] == 0
    steps_logged = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1)), "log lines duplicated or missing"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002", "checkpoint-00000004",
                                                                        "latest"]  # fmt: skip
    assert [p.name for p in (out / "validation").iterdir()] == [f"step-{steps:08d}.png"]
    assert "Traceback" not in proc.stderr and not (out / ".lcmkit.lock").exists()

    assert main(args(tmp_path / "one", 2)) == 0
    two = load_file(out / "pytorch_lora_weights.safetensors")
    one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    assert two.keys() == one.keys()
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert 0 < worst <= 2 * steps * lr, worst
    moved = max(two[k].abs().max().item() for k in two if "lora_B" in k)  # B starts at zero
    assert lr / 2 < moved <= 1.1 * steps * lr


def test_fsdp_full_distillation_matches_data_parallel_and_resumes_exactly(tiny_flux, shards, tmp_path):
    """FSDP2 through accelerate (2 CPU processes, gloo) on a tiny FLUX transformer: student, EMA target and teacher
    sharded. The losses and the saved transformer equal plain data parallel's bit for bit (which equals one process
    accumulating both processes' batches: test_two_processes_average_gradients...); a run stopped after its step 3
    checkpoint and resumed retraces steps 4..6, each process with its own noise stream again."""

    def args(out: Path, steps: int, *extra: str) -> list[str]:
        return ["-m", "lcmkit", "distill", "--teacher", tiny_flux, "--data", shards, "--out", str(out), "--mode",
                "full", "--max-steps", str(steps), "--batch-size", "2", "--resolution", "64", "--learning-rate",
                "1e-3", "--checkpoint-every", "3", "--log-every", "1", "--shuffle-buffer", "4", "--seed", "3",
                "--no-progress", *extra]  # fmt: skip

    def losses(out: Path) -> list[tuple[int, float]]:
        lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    runs = {"fsdp": (True, 6), "ddp": (False, 6), "stopped": (True, 4)}
    for name, (fsdp, steps) in runs.items():
        proc = launch(args(tmp_path / name, steps), fsdp=fsdp)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "stopped" / "lcmkit_run.json").unlink()
    proc = launch(args(tmp_path / "stopped", 6, "--resume", "latest"), fsdp=True)
    assert proc.returncode == 0 and "resumed at step 3" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp" / "lcmkit_run.json").read_text())["num_processes"] == 2
    assert losses(tmp_path / "fsdp") == losses(tmp_path / "ddp") == losses(tmp_path / "stopped")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    sharded, plain, resumed = (load_file(tmp_path / name / weights) for name in ("fsdp", "ddp", "stopped"))
    assert sharded.keys() == plain.keys() and len(sharded) > 10
    for key in sharded:
        assert torch.equal(sharded[key], plain[key]) and torch.equal(sharded[key], resumed[key]), key
    first = load_file(tmp_path / "fsdp" / "checkpoints" / "checkpoint-00000003" / "state.safetensors")
    assert {"rng@0.torch", "rng@1.torch"} <= set(first)  # each process's own random state


def test_fsdp_refuses_a_lora_run(tiny_flux, shards, tmp_path):
    proc = launch(["-m", "lcmkit", "distill", "--teacher", tiny_flux, "--data", shards, "--out", str(tmp_path / "o"),
                   "--mode", "lora", "--max-steps", "2"], fsdp=True)  # fmt: skip
    assert proc.returncode != 0 and "lcmkit: error: FSDP shards full distillation" in proc.stderr, proc.stderr[-2000:]
    assert "[rank0]: Traceback" not in proc.stderr and not (tmp_path / "o").exists()  # refused before any work
