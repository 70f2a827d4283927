"""A small accelerate training loop: accumulation, mixed precision, clipping, checkpoints, resume,
logging, periodic callbacks. It knows nothing of LCD: it minimises whatever `loss_fn` returns.

Checkpoints hold no pickle: tensors go to safetensors and the rest (optimizer hyperparameters, RNG
states, step) to JSON. Each is written under a temporary name and renamed, then `latest` is
replaced atomically, so a killed run never points at a half-written checkpoint; a failed write (full disk,
permissions) removes its temporary folder and leaves the previous checkpoint as it was.

A step whose loss or gradients are not finite is skipped (no optimizer step, no EMA update) and counted; all
processes agree on it. After `max_nonfinite_steps` such steps in a row the run stops with TrainingError.

Test hooks (environment variables read only by the test suite's subprocesses; unset in normal use):
LCMKIT_TEST_INJECT_NAN_AT_STEP="3,5@1" makes the loss NaN at step 3 (every process) and step 5 (process 1 only);
LCMKIT_TEST_PAUSE_IN_CHECKPOINT_AT_STEP=4 sleeps inside checkpoint 4's write, between writing its files and
renaming its folder, so that a test can kill the process in the middle of a checkpoint write.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.profiler import record_function
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
NAN_HOOK = "LCMKIT_TEST_INJECT_NAN_AT_STEP"
PAUSE_HOOK = "LCMKIT_TEST_PAUSE_IN_CHECKPOINT_AT_STEP"


class TrainingError(RuntimeError):
    """A fault that stops a run (non-finite steps, a failed checkpoint write, a damaged checkpoint): one line."""


class PeerFailed(TrainingError):
    """Another process of a multi-process run failed (and reported it); this one stops without a message."""


def os_error_text(e: OSError) -> str:
    """'No space left on device: /path' from an OSError (or its message when it has no errno)."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


def _hook_steps(name: str, rank: int) -> set[int]:
    steps = set()
    for item in filter(None, os.environ.get(name, "").split(",")):
        step, _, only_rank = item.partition("@")
        if not only_rank or int(only_rank) == rank:
            steps.add(int(step))
    return steps


def on_main(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """fn() on the main process only. An exception there is re-raised there and, as PeerFailed, on every other
    process, so that none of them waits forever at the next collective operation."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if error is None else str(error)])[0]
        if message is not None and error is None:
            raise PeerFailed(message)
    if error is not None:
        raise error
    return result


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


class GeneratorState:
    """Makes a torch.Generator checkpointable."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


class GlobalRNGState:
    """torch (and CUDA), numpy and Python global RNG states."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# -- pickle-free serialization of nested state ------------------------------------------------------


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [
            _flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)
        ]}  # fmt: skip
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(folder: Path, step: int, objects: dict[str, Stateful], meta: dict[str, Any]) -> Path:
    """Write checkpoint-<step> atomically and point `latest` at it. On failure the temporary folder is removed
    and the error raised; `latest` and the checkpoints before it are untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".checkpoint-*.tmp-*"):  # left by a killed run (one run per folder: the lock)
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"checkpoint-{step:08d}"
    tmp = folder / f".checkpoint-{step:08d}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        structure = {name: _flatten(obj.state_dict(), name, tensors) for name, obj in objects.items()}
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "meta": meta, "state": structure}))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if step in _hook_steps(PAUSE_HOOK, 0):
            time.sleep(60)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    atomic_write_text(folder / "latest", final.name + "\n")
    return final


def find_checkpoint(out_dir: Path, spec: str) -> Path | None:
    """'latest' -> the checkpoint `latest` points to (None if there is none yet); else a folder."""
    folder = out_dir / CHECKPOINT_DIR
    if spec == "latest":
        pointer = folder / "latest"
        if not pointer.is_file():
            return None
        path = folder / pointer.read_text().strip()
    else:
        path = Path(spec)
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a complete lcmkit checkpoint")
    return path


def load_checkpoint(path: Path, objects: dict[str, Stateful]) -> dict[str, Any]:
    try:
        record = json.loads((path / "state.json").read_text())
    except ValueError as e:
        raise TrainingError(f"checkpoint {path / 'state.json'} is damaged (not valid JSON: {e})") from None
    try:
        tensors = load_file(path / "state.safetensors")
    except Exception as e:
        from .safe_load import first_line

        raise TrainingError(f"checkpoint {path / 'state.safetensors'} is damaged ({first_line(e)})") from None
    for name, obj in objects.items():
        if name not in record["state"]:
            raise KeyError(f"checkpoint {path} has no state for {name}")
        obj.load_state_dict(_unflatten(record["state"][name], tensors))
    return record


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    if not keep:
        return
    done = sorted(p for p in folder.glob("checkpoint-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def accelerator_session(**kwargs: Any) -> Iterator[Any]:
    """An Accelerator whose process-wide state is reset on exit, so that a library user (or a test) can
    run several trainings with different settings in one process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(**kwargs)
    try:
        yield accelerator
        accelerator.wait_for_everyone()  # gloo can hang destroying a group whose peer already left
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)


# -- the loop ---------------------------------------------------------------------------------------


PROFILE_FILE = "profile.json"


class StepProfiler:
    """torch.profiler over a few steps, summarised by the record_function labels of the step's phases
    ("train/data", "train/backward", ... and whatever the loss function labels): milliseconds per step."""

    def __init__(self, steps: int, cuda: bool):
        self.steps, self.cuda, self.running = steps, cuda, False

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self.running = True

    def stop(self, step_times: list[float], path: Path, write: bool) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        self.running = False
        n = max(len(step_times), 1)
        phases = {
            e.key: e.cpu_time_total / 1000 / n
            for e in self._prof.key_averages()
            if "/" in e.key and e.key.split("/")[0] in ("train", "lcd")
        }
        step_ms = 1000 * sum(step_times) / n
        summary = {
            "steps": len(step_times),
            "ms_per_step": step_ms,
            "phases_ms": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
            "unlabelled_ms": step_ms - sum(phases.values()),
            "note": "wall-clock ms per step under the profiler (which adds some overhead); phases do not overlap",
        }
        if write:
            atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        return summary


@dataclass
class TrainerSettings:
    out_dir: Path
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 0
    checkpoints_total_limit: int | None = None
    log_every: int = 10
    callback_every: int = 0
    progress: bool = True
    description: str = "training"
    max_nonfinite_steps: int = 10
    profile_steps: int = 0
    """Profile this many steps after the first (warm-up) one; the breakdown goes to out_dir/profile.json."""


@dataclass
class TrainResult:
    steps: int
    start_step: int
    median_s_per_step: float | None
    samples_per_s: float | None
    final_loss: float | None
    wall_s: float
    nonfinite_steps: int = 0


class Trainer:
    """Minimises `loss_fn(batch) -> (loss, logs)` over `dataloader` batches.

    `state` names every object to checkpoint besides the optimizer, scheduler and global RNGs
    (trainable weights, EMA copies, private generators). `on_step_end` runs after each optimizer
    step (e.g. an EMA update); `callback(step)` runs every `callback_every` steps on the main process.
    """

    def __init__(
        self,
        accelerator: Any,
        settings: TrainerSettings,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        dataloader: Any,
        loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, Any]]],
        state: dict[str, Stateful],
        on_step_end: Callable[[], None] | None = None,
        callback: Callable[[int], None] | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.accelerator = accelerator
        self.settings = settings
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.state = {**state, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "rng": GlobalRNGState()}
        self.on_step_end = on_step_end
        self.callback = callback
        self.meta = meta or {}
        self.step = 0
        self.nonfinite_steps = 0
        self._nan_steps = _hook_steps(NAN_HOOK, accelerator.process_index)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @property
    def checkpoint_folder(self) -> Path:
        return self.settings.out_dir / CHECKPOINT_DIR

    def resume(self, spec: str) -> bool:
        """Load a checkpoint ('latest' or a path); False when 'latest' finds none."""
        path = find_checkpoint(self.settings.out_dir, spec)
        if path is None:
            return False
        record = load_checkpoint(path, self.state)
        self.step = int(record["step"])
        self.nonfinite_steps = int(record.get("meta", {}).get("nonfinite_steps", 0))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def last_checkpoint(self) -> str:
        pointer = self.checkpoint_folder / "latest"
        return str(self.checkpoint_folder / pointer.read_text().strip()) if pointer.is_file() else "none written yet"

    def _write_checkpoint(self) -> Path:
        try:
            path = save_checkpoint(
                self.checkpoint_folder, self.step, self.state, {**self.meta, "nonfinite_steps": self.nonfinite_steps}
            )
        except OSError as e:
            raise TrainingError(
                f"could not write the step {self.step} checkpoint in {self.checkpoint_folder} ({os_error_text(e)}); "
                f"the previous checkpoint is intact ({self.last_checkpoint()}): free space or fix permissions, then "
                "continue with --resume latest"
            ) from None
        prune_checkpoints(self.checkpoint_folder, self.settings.checkpoints_total_limit)
        return path

    def save(self) -> Path | None:
        """Main process writes; a failure stops every process with one message."""
        self.accelerator.wait_for_everyone()
        return on_main(self.accelerator, self._write_checkpoint)

    def _grad_norm(self) -> torch.Tensor:
        """Total gradient norm; clips to max_grad_norm when set. Non-finite iff some gradient is."""
        if self.settings.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
            if norm is not None:  # DeepSpeed may not report it
                return torch.as_tensor(norm)
        else:
            self.accelerator.unscale_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _all_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Loss and gradients finite on every process (all agree, so all skip or all step)."""
        bad = (~torch.isfinite(loss + grad_norm.to(loss.device))).float().to(self.accelerator.device)
        return float(self.accelerator.reduce(bad, "sum")) == 0

    def _batches(self) -> Iterator[Any]:
        it = iter(self.dataloader)
        # Resume exactly: the data order is a function of the seed, so skip what was consumed.
        for _ in range(self.step * self.settings.gradient_accumulation_steps):
            next(it)
        return it

    def _log(self, record: dict[str, Any]) -> None:
        self.accelerator.log(record, step=self.step)
        if self.accelerator.is_main_process:
            logs = self.settings.out_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "time": round(time.time(), 3), **record}) + "\n")

    def run(self) -> TrainResult:
        s, acc = self.settings, self.accelerator
        start_step, t_start = self.step, time.perf_counter()
        batches = self._batches()
        accum = s.gradient_accumulation_steps
        samples_per_step = s.batch_size * accum * acc.num_processes
        bar = tqdm(total=s.max_steps, initial=self.step, desc=s.description, dynamic_ncols=True,
                   disable=not (s.progress and acc.is_local_main_process))  # fmt: skip
        step_times: list[float] = []
        loss_value = None
        in_a_row = 0
        self.model.train()
        profiler = StepProfiler(s.profile_steps, acc.device.type == "cuda") if s.profile_steps else None
        while self.step < s.max_steps:
            if profiler is not None and self.step == start_step + 1:
                profiler.start()
            t0 = time.perf_counter()
            total_loss = torch.zeros((), device=acc.device)
            logs: dict[str, Any] = {}
            for micro in range(accum):
                with record_function("train/data"):
                    batch = next(batches)
                sync = acc.no_sync(self.model) if micro < accum - 1 else nullcontext()
                with sync, acc.autocast():
                    loss, logs = self.loss_fn(batch)
                    if self.step + 1 in self._nan_steps:  # test hook, see the module docstring
                        loss = loss * float("nan")
                    with record_function("train/backward"):
                        acc.backward(loss / accum)
                total_loss += loss.detach() / accum
            with record_function("train/optimizer"):
                finite = self._all_finite(total_loss, self._grad_norm())  # clipped when finite
                if finite or getattr(acc, "scaler", None) is not None:
                    self.optimizer.step()  # an fp16 loss scaler skips an overflowing update itself and lowers its scale
                self.lr_scheduler.step()  # the schedule stays a function of the step, skipped or not
                self.optimizer.zero_grad(set_to_none=True)
            if finite and self.on_step_end is not None:
                with record_function("train/on_step_end"):
                    self.on_step_end()
            self.step += 1
            step_times.append(time.perf_counter() - t0)

            in_a_row = 0 if finite else in_a_row + 1
            if not finite:
                self.nonfinite_steps += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all)",
                            self.step, in_a_row, self.nonfinite_steps)  # fmt: skip
                self._log({"nonfinite": True, "nonfinite_steps": self.nonfinite_steps})
                if in_a_row >= s.max_nonfinite_steps:
                    bar.close()
                    raise TrainingError(
                        f"{in_a_row} consecutive steps with a non-finite loss or gradient (steps "
                        f"{self.step - in_a_row + 1}-{self.step}, all skipped): stopped at step {self.step}; the last "
                        f"good checkpoint is intact ({self.last_checkpoint()}): lower --learning-rate or check the "
                        "data, then continue with --resume latest"
                    )
            elif self.step % s.log_every == 0 or self.step == s.max_steps:
                loss_value = float(acc.reduce(total_loss, "mean"))
                lr = self.lr_scheduler.get_last_lr()[0]
                rate = samples_per_step / statistics.median(step_times[-20:])
                self._log(
                    {"loss": loss_value, "lr": lr, "samples_per_s": rate, **{k: float(v) for k, v in logs.items()}}
                )
                bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2g}", samples_s=f"{rate:.1f}")
            bar.update(1)
            if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                if finite:
                    self.save()
                else:
                    log.warning("step %d: no checkpoint after a skipped non-finite step", self.step)
            if self.callback is not None and s.callback_every and self.step % s.callback_every == 0:
                if acc.is_main_process:
                    self.callback(self.step)
                acc.wait_for_everyone()
            if profiler is not None and profiler.running and self.step == start_step + 1 + s.profile_steps:
                profiler.stop(step_times[-s.profile_steps :], s.out_dir / PROFILE_FILE, acc.is_main_process)
        if profiler is not None and profiler.running:
            profiler.stop(step_times[1:], s.out_dir / PROFILE_FILE, acc.is_main_process)
        bar.close()
        timed = step_times[1:] or step_times  # the first step pays for warm-up
        median = statistics.median(timed) if timed else None
        return TrainResult(
            steps=self.step, start_step=start_step, median_s_per_step=median,
            samples_per_s=samples_per_step / median if median else None, final_loss=loss_value,
            wall_s=time.perf_counter() - t_start, nonfinite_steps=self.nonfinite_steps,
        )  # fmt: skip
