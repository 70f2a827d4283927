"""A real `python -m lcmkit distill` killed with SIGKILL at three moments (in the middle of a checkpoint write,
while loading, between steps) and resumed with --resume latest ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from lcmkit.train.checkpoint import PAUSE_HOOK
from lcmkit.train.lock import LOCK_NAME

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 8


def lcmkit_env(**extra: str) -> dict[str, str]:
    """This checkout's lcmkit first on the path, one thread (a deterministic CPU run), offline."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCMKIT_TEST_")}
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lcmkit", *args], env=lcmkit_env(**env),
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # fmt: skip


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def latest(out: Path) -> str | None:
    pointer = out / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def lock_pid(out: Path) -> int | None:
    try:
        return json.loads((out / LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_at_three_moments_then_resume_matches_an_uninterrupted_run(tiny_sd, shards, tmp_path):
    def args(out: Path, *extra: str) -> list[str]:
        return ["distill", "--teacher", tiny_sd, "--data", shards, "--out", str(out), "--max-steps", str(STEPS),
                "--batch-size", "2", "--resolution", "64", "--lora-rank", "4", "--learning-rate", "1e-3",
                "--checkpoint-every", "2", "--log-every", "1", "--shuffle-buffer", "4", "--seed", "5",
                "--no-progress", *extra]  # fmt: skip

    reference = start(args(tmp_path / "reference"), tmp_path / "reference.log")
    out = tmp_path / "killed"
    checkpoints = out / "checkpoints"

    # 1. in the middle of writing checkpoint 4: its files are written, its folder not yet renamed
    proc = start(args(out), tmp_path / "1.log", **{PAUSE_HOOK: "4"})
    kill_when(proc, lambda: any((p / "state.json").is_file() for p in checkpoints.glob(".checkpoint-00000004.tmp-*")))
    assert latest(out) == "checkpoint-00000002", "latest points at a partial checkpoint"
    assert list(checkpoints.glob(".checkpoint-00000004.tmp-*")) and not (checkpoints / "checkpoint-00000004").exists()

    # 2. while starting up (teacher loading), holding the lock: the lock is left stale
    proc = start(args(out, "--resume", "latest"), tmp_path / "2.log")
    kill_when(proc, lambda: lock_pid(out) == proc.pid)
    assert lock_pid(out) == proc.pid

    # 3. between steps, right after checkpoint 6
    proc = start(args(out, "--resume", "latest"), tmp_path / "3.log")
    kill_when(proc, lambda: latest(out) == "checkpoint-00000006" and not time.sleep(random.uniform(0, 0.2)))
    assert "taking over the stale lock" in (tmp_path / "3.log").read_text()
    # run 1's partial checkpoint 4 is gone (run 3 itself may have been killed while writing checkpoint 8)
    assert not list(checkpoints.glob(".checkpoint-00000004.tmp-*")), "a killed run's partial checkpoint is left behind"

    # resumed to the end
    proc = start(args(out, "--resume", "latest"), tmp_path / "4.log")
    assert proc.wait(timeout=180) == 0, (tmp_path / "4.log").read_text()
    assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()
    assert not (out / LOCK_NAME).exists()
    assert not list(checkpoints.glob(".checkpoint-*.tmp-*")), "a killed run's partial checkpoint is left behind"

    got = load_file(out / "pytorch_lora_weights.safetensors")
    want = load_file(tmp_path / "reference" / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, f"final weights differ from the uninterrupted run by {worst}"
    assert any((want[k] - torch.zeros_like(want[k])).abs().max() > 0 for k in want if "lora_B" in k)
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == STEPS
    # steps a killed attempt logged past its last checkpoint were dropped on resume: each step logged once
    assert [r["step"] for r in log if "loss" in r] == list(range(1, STEPS + 1))
    assert re.search(r"resumed at step [68] from", (tmp_path / "4.log").read_text())  # said without -v


def test_sigterm_stops_cleanly_releases_the_lock_and_resumes(tiny_sd, shards, tmp_path):
    """What job schedulers and `kill` send: one line, no traceback, no lock left, and --resume latest continues."""
    out = tmp_path / "run"
    args = ["distill", "--teacher", tiny_sd, "--data", shards, "--out", str(out), "--max-steps", "200",
            "--batch-size", "2", "--resolution", "64", "--lora-rank", "4", "--checkpoint-every", "2",
            "--no-progress"]  # fmt: skip
    proc = start(args, tmp_path / "1.log")
    deadline = time.monotonic() + 120
    while latest(out) is None:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "1.log").read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = (tmp_path / "1.log").read_text()
    assert "Traceback" not in err and "stopped by SIGTERM" in err and "--resume latest" in err
    assert not (out / LOCK_NAME).exists()
    proc = start([*args[:-1], "--max-steps", "4", "--resume", "latest", "--no-progress"], tmp_path / "2.log")
    assert proc.wait(timeout=180) == 0, (tmp_path / "2.log").read_text()
    assert "resumed at step" in (tmp_path / "2.log").read_text()
