"""Faults a long run meets: non-finite steps, a second run on the same folder, a full or read-only disk, damaged
or hostile weight files. Each ends with one line on stderr and a non-zero exit, and loses nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcmkit.app.cli import main
from lcmkit.train import checkpoint, loop
from lcmkit.train.lock import LOCK_NAME, RunLock


def run(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def distill_args(teacher: str, data: str, out: Path, steps: int, *extra: str) -> list[str]:
    return ["distill", "--teacher", teacher, "--data", data, "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "1", "--resolution", "64", "--lora-rank", "2", "--no-progress", "--log-every", "1",
            "--shuffle-buffer", "2", "--checkpoint-every", "2", *extra]  # fmt: skip


def assert_one_error_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("lcmkit: error: "), err
    for needle in needles:
        assert needle in last, (needle, last)


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def checkpoint_is_loadable(path: Path) -> None:
    """What --resume reads: the JSON record and every tensor, finite."""
    json.loads((path / "state.json").read_text())
    assert all(torch.isfinite(t).all() for t in load_file(path / "state.safetensors").values() if t.is_floating_point())


# -- non-finite loss or gradients -----------------------------------------------------------------------------------


def test_a_nonfinite_step_is_skipped_counted_and_logged(capsys, caplog, monkeypatch, tiny_sd, shards, tmp_path):
    monkeypatch.setenv(loop.NAN_HOOK, "2")
    out = tmp_path / "run"
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 3))
    assert code == 0, err
    assert "step 2: non-finite loss or gradient, step skipped" in caplog.text
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["nonfinite_steps"] == 1 and record["steps"] == 3
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("nonfinite")] == [2]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values()), "a NaN step reached the weights"
    assert not (out / "checkpoints" / "checkpoint-00000002").exists(), "checkpointed right after a skipped step"


def test_consecutive_nonfinite_steps_stop_with_the_last_good_checkpoint(capsys, monkeypatch, tiny_sd, shards, tmp_path):
    out = tmp_path / "run"
    monkeypatch.setenv(loop.NAN_HOOK, "3,4")
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 6, "--max-nonfinite-steps", "2"))
    assert code == 1
    assert_one_error_line(err, "2 consecutive steps", "steps 3-4", "stopped at step 4", "checkpoint-00000002")
    assert latest(out) == "checkpoint-00000002" and not (out / "checkpoints" / "checkpoint-00000004").exists()
    checkpoint_is_loadable(out / "checkpoints" / "checkpoint-00000002")
    assert not (out / "lcmkit_run.json").exists() and not (out / LOCK_NAME).exists(), "lock kept after an error"
    monkeypatch.delenv(loop.NAN_HOOK)
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 6, "--resume", "latest"))
    assert code == 0, err
    assert json.loads((out / "lcmkit_run.json").read_text())["steps"] == 6


# -- one run per output folder -----------------------------------------------------------------------------------


def test_a_live_lock_is_refused_and_kept(capsys, tiny_sd, shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": owner.pid, "host": socket.gethostname(), "started": "2025-01-01T00:00:00"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        code, err = run(capsys, *distill_args(tiny_sd, shards, out, 1))
        assert code == 2
        assert_one_error_line(err, f"pid {owner.pid}", "in use by another lcmkit run")
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == owner.pid
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        owner.kill()
        owner.wait()


def test_a_stale_lock_is_taken_over_and_released(capsys, caplog, tiny_sd, shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 1))
    assert code == 0, err
    assert "taking over the stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_lock_is_exclusive_and_names_its_owner(tmp_path):
    first = RunLock(tmp_path / "out", "lcmkit distill ...")
    with first:
        owner = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] and owner["started"]
        from lcmkit.errors import ConfigError

        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "out").acquire()
    assert not (tmp_path / "out").exists(), "an empty folder the lock created is left behind"
    # garbage in a lock file: stale once older than the grace period, refused before
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / LOCK_NAME).write_text("garbage")
    with pytest.raises(Exception, match="being written"):
        RunLock(tmp_path / "g").acquire()
    os.utime(tmp_path / "g" / LOCK_NAME, (0, 0))
    with RunLock(tmp_path / "g"):
        pass


# -- disk and permission faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code_, text", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only")])
def test_a_failed_checkpoint_write_keeps_the_previous_one(capsys, monkeypatch, tiny_sd, shards, tmp_path, code_, text):
    real_save, calls = checkpoint.save_file, []

    def failing_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the step 4 checkpoint, part-written
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(code_, os.strerror(code_), str(path))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    out = tmp_path / "run"
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 6))
    assert code == 1
    assert_one_error_line(err, text, "step 4 checkpoint", "previous checkpoint is intact", "checkpoint-00000002")
    assert latest(out) == "checkpoint-00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002", "latest"]
    checkpoint_is_loadable(out / "checkpoints" / "checkpoint-00000002")
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 6, "--resume", "latest"))
    assert code == 0, err


def test_a_read_only_checkpoint_folder(capsys, tiny_sd, shards, tmp_path):
    out = tmp_path / "run"
    assert main(distill_args(tiny_sd, shards, out, 2)) == 0
    folder = out / "checkpoints"
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.mkdir()
            probe.rmdir()
            pytest.skip("running as root: a read-only mode does not stop writes (the injected EROFS test covers it)")
        except PermissionError:
            pass
        code, err = run(capsys, *distill_args(tiny_sd, shards, out, 4, "--resume", "latest"))
        assert code == 1
        assert_one_error_line(err, "Permission denied", "checkpoint-00000002")
        assert latest(out) == "checkpoint-00000002"
    finally:
        folder.chmod(0o755)


def test_a_damaged_checkpoint_is_named_on_resume(capsys, tiny_sd, shards, tmp_path):
    out = tmp_path / "run"
    code, _ = run(capsys, *distill_args(tiny_sd, shards, out, 2))
    assert code == 0
    (out / "lcmkit_run.json").unlink()
    state = out / "checkpoints" / "checkpoint-00000002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    code, err = run(capsys, *distill_args(tiny_sd, shards, out, 4, "--resume", "latest"))
    assert code == 1
    assert_one_error_line(err, str(state), "damaged")


# -- untrusted files ---------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_files_are_refused_unless_allowed_then_read_without_code(capsys, tiny_sd_lora, tmp_path):
    lora = load_file(Path(tiny_sd_lora) / "pytorch_lora_weights.safetensors")
    as_bin = tmp_path / "lora.bin"
    torch.save(lora, as_bin)
    code, err = run(capsys, "export", "kohya", as_bin, "--out", tmp_path / "k1")
    assert code == 2
    assert_one_error_line(err, str(as_bin), "pickle", "--allow-pickle")
    code, err = run(capsys, "export", "kohya", as_bin, "--out", tmp_path / "k2", "--allow-pickle")
    assert code == 0, err
    assert len(load_file(tmp_path / "k2" / "lcm_lora_kohya.safetensors")) == len(lora) + len(lora) // 2
    # even allowed, a pickle that runs code is refused (weights_only=True), and the code never runs
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    code, err = run(capsys, "export", "kohya", tmp_path / "evil.pt", "--out", tmp_path / "k3", "--allow-pickle")
    assert code == 2 and not marker.exists()
    assert_one_error_line(err, "evil.pt", "weights_only=True")


def test_a_pickle_only_teacher_component_is_refused_unless_allowed(capsys, tiny_sd, shards, tmp_path):
    from lcmkit.errors import ConfigError
    from lcmkit.families.teacher import ModelConfig, load_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), teacher / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    code, err = run(capsys, *distill_args(str(teacher), shards, tmp_path / "o", 1))
    assert code == 2
    assert_one_error_line(err, "diffusion_pytorch_model.bin", "pickle")
    with pytest.raises(ConfigError, match="pickle"):
        load_teacher(ModelConfig(teacher=str(teacher)))
    loaded = load_teacher(ModelConfig(teacher=str(teacher), allow_pickle=True))
    reference = load_teacher(ModelConfig(teacher=tiny_sd))
    for a, b in zip(loaded.denoiser.parameters(), reference.denoiser.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_malformed_safetensors_are_named(capsys, tiny_sd, tiny_sd_lora, shards, tmp_path, damage):
    def spoil(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(256))

    lora = tmp_path / "lora.safetensors"
    shutil.copy(Path(tiny_sd_lora) / "pytorch_lora_weights.safetensors", lora)
    spoil(lora)
    generate = ["generate", "--base", tiny_sd, "--lora", lora, "--prompt", "x", "--out", tmp_path / "g"]
    for args in (["export", "kohya", lora, "--out", tmp_path / "k"], ["info", lora], generate):
        code, err = run(capsys, *args)
        assert code == 2, args
        assert_one_error_line(err, str(lora))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    spoil(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    code, err = run(capsys, *distill_args(str(teacher), shards, tmp_path / "o", 1))
    assert code == 2
    assert_one_error_line(err, str(teacher / "unet" / "diffusion_pytorch_model.safetensors"), "not a valid")


def test_a_pickle_single_file_teacher_loads_only_when_allowed(tiny_sd, tmp_path):
    from lcmkit.errors import ConfigError
    from lcmkit.families.single_file import export_single_file
    from lcmkit.families.teacher import ModelConfig, load_teacher

    single = export_single_file(tiny_sd, tmp_path / "model.safetensors")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(single), "global_step": 7}, ckpt)
    with pytest.raises(ConfigError, match="pickle"):
        load_teacher(ModelConfig(teacher=str(ckpt), teacher_config=tiny_sd))
    loaded = load_teacher(ModelConfig(teacher=str(ckpt), teacher_config=tiny_sd, allow_pickle=True))
    reference = load_teacher(ModelConfig(teacher=str(single), teacher_config=tiny_sd))
    for a, b in zip(loaded.denoiser.parameters(), reference.denoiser.parameters()):
        assert torch.equal(a, b)


def test_no_code_runs_from_loaded_files_anywhere():
    """No remote code, no unrestricted unpickling in the product (the toy VAE's own state included)."""
    src = Path(__file__).resolve().parents[1] / "src" / "lcmkit"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for needle in ("trust_remote_code", "weights_only=False", "pickle.load", "custom_pipeline"):
            assert needle not in text, f"{needle} in {path}"
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_bench_soak_summary_measures_growth_after_the_reference_step():
    from lcmkit.measure.bench import SoakBench, soak_summary

    points = [(0, 100.0), (150, 300.0), (200, 400.0), (600, 410.0), (990, 420.0), (1000, 500.0)]
    samples = [{"t": i, "step": s, "rss_mb": r, "peak_mb": r} for i, (s, r) in enumerate(points)]
    r = soak_summary(SoakBench("t", "d", steps=1000, at_step=200), samples, {"peak_rss_mb": 500.0,
                     "median_s_per_step": 0.1})  # fmt: skip
    assert (r["rss_at_step_mb"], r["rss_end_mb"], r["end_step"]) == (400.0, 420.0, 990)
    assert r["growth_pct"] == pytest.approx(5.0) and r["max_rss_after_mb"] == 420.0


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Steps logged after the checkpoint a run resumes from are run again: the log keeps them once."""
    from lcmkit.train.loop import LoopSettings, Trainer, Update
    from lcmkit.train.session import accelerator_session

    def run(resume: str | None) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        batches = [{"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(i))} for i in range(100)]
        with accelerator_session(cpu=True) as acc:
            update = Update("model", model, optimizer, scheduler, lambda b: (model(b["x"]).pow(2).mean(), {}))
            trainer = Trainer(acc, LoopSettings(max_steps=4, batch_size=2, checkpoint_every=2, log_every=1,
                                                progress=False), tmp_path, [update], batches, state={"model": model})
            if resume:
                trainer.resume(resume)
            trainer.run()

    run(None)
    run(str(tmp_path / "checkpoints" / "checkpoint-00000002"))  # as after a kill between steps 2 and 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_the_trainer_steps_two_models_and_resumes_both_exactly(tmp_path):
    """Two updates per step (a generator and a discriminator, each with its own optimizer): each is stepped on its
    own loss only, both optimizers are checkpointed, and a resumed run ends with the same weights."""
    from safetensors.torch import load_file as load

    from lcmkit.train.loop import LoopSettings, Trainer, Update
    from lcmkit.train.session import accelerator_session

    def nets():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def g_loss(gen, disc, x):  # also puts gradients on the discriminator: they must not reach its step
        return -disc(gen(x)).mean()

    def d_loss(gen, disc, x):
        return torch.relu(1 + disc(gen(x).detach())).mean() + torch.relu(1 - disc(x)).mean()

    def run(out, steps: int, resume: str | None = None) -> dict[str, torch.Tensor]:
        gen, disc = nets()
        opt_g, opt_d = torch.optim.Adam(gen.parameters(), 1e-2), torch.optim.Adam(disc.parameters(), 1e-2)
        sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in (opt_g, opt_d)]
        batches = [{"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(i))} for i in range(100)]
        updates = [
            Update("generator", gen, opt_g, sched[0], lambda b: (g_loss(gen, disc, b["x"]), {})),
            Update("discriminator", disc, opt_d, sched[1], lambda b: (d_loss(gen, disc, b["x"]), {})),
        ]
        settings = LoopSettings(max_steps=steps, batch_size=2, checkpoint_every=2, log_every=1, progress=False)
        with accelerator_session(cpu=True) as acc:
            trainer = Trainer(acc, settings, out, updates, batches, state={"gen": gen, "disc": disc})
            if resume:
                trainer.resume(resume)
            trainer.run()
        weights = {f"g.{k}": v for k, v in gen.state_dict().items()}
        return weights | {f"d.{k}": v for k, v in disc.state_dict().items()}

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 4)
    resumed = run(tmp_path / "cut", 4, str(tmp_path / "cut" / "checkpoints" / "checkpoint-00000002"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    state = load(tmp_path / "whole" / "checkpoints" / "checkpoint-00000004" / "state.safetensors")
    assert any(k.startswith("optimizer.discriminator") for k in state)
    logged = json.loads((tmp_path / "whole" / "logs" / "train_log.jsonl").read_text().splitlines()[-1])
    assert "loss" in logged and "loss_discriminator" in logged

    # one step by hand: the discriminator's Adam step sees the gradients of its own loss only
    gen, disc = nets()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    opt_g, opt_d = torch.optim.Adam(gen.parameters(), 1e-2), torch.optim.Adam(disc.parameters(), 1e-2)
    g_loss(gen, disc, x).backward()
    opt_g.step()
    disc.zero_grad()
    d_loss(gen, disc, x).backward()
    opt_d.step()
    one = run(tmp_path / "one", 1)
    assert all(torch.allclose(one[f"d.{k}"], v) for k, v in disc.state_dict().items())
    assert all(torch.allclose(one[f"g.{k}"], v) for k, v in gen.state_dict().items())
