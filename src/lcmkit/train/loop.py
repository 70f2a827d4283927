"""A small accelerate training loop: accumulation, mixed precision, clipping, checkpoints, resume,
logging, periodic callbacks. It knows nothing of distillation: it minimises whatever `loss_fn` returns.

A step whose loss or gradients are not finite is skipped (no optimizer step, no EMA update) and counted; all
processes agree on it. After `max_nonfinite_steps` such steps in a row the run stops with TrainingError.

Test hook (read only by the test suite's subprocesses; unset in normal use): LCMKIT_TEST_INJECT_NAN_AT_STEP="3,5@1"
makes the loss NaN at step 3 (every process) and step 5 (process 1 only)."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from lcmkit.errors import os_error_text
from lcmkit.train.checkpoint import (
    CHECKPOINT_DIR,
    GlobalRNGState,
    Stateful,
    atomic_write_text,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lcmkit.train.session import TrainingError, _hook_steps, on_main
from lcmkit.train.sharding import ShardedState, full_norm, is_sharded

log = logging.getLogger(__name__)


NAN_HOOK = "LCMKIT_TEST_INJECT_NAN_AT_STEP"


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

    def top_ops(self, n: int, k: int = 15) -> dict[str, float]:
        """The k operators (kernels on CUDA) that cost most, by their own time: milliseconds per step."""

        def own(e: Any) -> float:
            if self.cuda:
                return getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
            return e.self_cpu_time_total

        events = [e for e in self._prof.key_averages() if "/" not in e.key]
        events.sort(key=own, reverse=True)
        return {e.key[:120]: round(own(e) / 1000 / n, 3) for e in events[:k]}

    def stop(self, step_times: list[float], path: Path, write: bool) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        self.running = False
        n = max(len(step_times), 1)
        phases: dict[str, float] = {}
        for e in self._prof.key_averages():
            if "/" in e.key and e.key.split("/")[0] in ("train", "lcd"):
                # On CUDA a phase's host time is only its kernel launches: its GPU time (the kernels inside the
                # range, CUDA events) is what it costs when the GPU is the bottleneck; the larger of the two.
                device = getattr(e, "device_time_total", 0.0) if self.cuda else 0.0
                phases[e.key] = max(phases.get(e.key, 0.0), max(e.cpu_time_total, device) / 1000 / n)
        step_ms = 1000 * sum(step_times) / n
        summary = {
            "steps": len(step_times),
            "ms_per_step": step_ms,
            "phases_ms": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
            "unlabelled_ms": step_ms - sum(phases.values()),
            "top_ops_ms": self.top_ops(n),
            "note": "wall-clock ms per step under the profiler (which adds some overhead); a phase is its host time, "
                    "or on CUDA its GPU time when larger; phases do not overlap on CPU",
        }
        if write:
            atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        return summary


@dataclass
class LoopSettings:
    """How the loop runs: the options of the [train] section that the trainer reads (and owns)."""

    max_steps: int = 1000
    """Optimizer steps to train."""
    batch_size: int = 8
    """Samples per step on each process."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients add up to one optimizer step."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    checkpoints_total_limit: int | None = None
    """Keep only this many newest checkpoints."""
    log_every: int = 10
    """Write loss and speed to logs/train_log.jsonl every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    max_nonfinite_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    profile_steps: int = 0
    """Profile this many steps after the first and write the time per phase to <out>/profile.json."""


@dataclass
class Update:
    """One optimizer's share of a training step: minimise `loss_fn(batch) -> (loss, logs)` over the parameters of
    `optimizer`. `model` is the (accelerate-prepared) module whose gradients synchronise across processes."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, Any]]]
    max_grad_norm: float | None = 1.0

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


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
    """Runs `updates` in order on every step's batches: one Update for plain training, more for e.g. a
    discriminator with its own optimizer (each loss is computed after the previous update's step).

    `state` names every object to checkpoint besides the optimizers, schedulers and global RNGs
    (trainable weights, EMA copies, private generators). `on_step_end` runs after each step whose updates were all
    finite (e.g. an EMA update); `callback(step)` runs every `callback_every` steps on the main process.
    """

    def __init__(
        self,
        accelerator: Any,
        settings: LoopSettings,
        out_dir: Path,
        updates: list[Update],
        dataloader: Any,
        state: dict[str, Stateful],
        on_step_end: Callable[[], None] | None = None,
        callback: Callable[[int], None] | None = None,
        callback_every: int = 0,
        description: str = "training",
        meta: dict[str, Any] | None = None,
    ):
        self.accelerator, self.settings, self.updates, self.dataloader = accelerator, settings, updates, dataloader
        self.out_dir, self.callback_every, self.description = Path(out_dir), callback_every, description
        self.state = {**state, "rng": GlobalRNGState()}
        for i, u in enumerate(updates):  # the first update's names are those of one-optimizer checkpoints
            suffix = "" if i == 0 else f".{u.name}"
            self.state.update({f"optimizer{suffix}": u.optimizer, f"lr_scheduler{suffix}": u.lr_scheduler})
        if is_sharded(accelerator):  # gathered to full tensors to save, sharded again to load
            self.state = {k: v if getattr(v, "per_process", False) else ShardedState(v) for k, v in self.state.items()}
        self.on_step_end, self.callback, self.meta = on_step_end, callback, meta or {}
        self.step = 0
        self.nonfinite_steps = 0
        self._nan_steps = _hook_steps(NAN_HOOK, accelerator.process_index)

    @property
    def checkpoint_folder(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    def resume(self, spec: str) -> bool:
        """Load a checkpoint ('latest' or a path); False when 'latest' finds none."""
        path = find_checkpoint(self.out_dir, spec)
        if path is None:
            return False
        record = load_checkpoint(path, self.state, self.accelerator.process_index)
        self.step = int(record["step"])
        self.nonfinite_steps = int(record.get("meta", {}).get("nonfinite_steps", 0))
        if self.accelerator.is_main_process:
            self._forget_logged_steps_after(self.step)
        log.warning("resumed at step %d from %s", self.step, path)  # said without -v: the user asked for it
        return True

    def _forget_logged_steps_after(self, step: int) -> None:
        """A killed attempt may have logged steps past its last checkpoint: drop them, they are run again."""
        path = self.out_dir / "logs" / "train_log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def last_checkpoint(self) -> str:
        pointer = self.checkpoint_folder / "latest"
        return str(self.checkpoint_folder / pointer.read_text().strip()) if pointer.is_file() else "none written yet"

    def _states(self) -> dict[str, Any]:
        """Every object's state_dict, computed on every process (a sharded model's is gathered collectively); a
        per-process object's from each process, as name@rank (and the main process's under its name)."""
        acc, states = self.accelerator, {}
        for name, obj in self.state.items():
            states[name] = obj.state_dict()
            if getattr(obj, "per_process", False) and acc.num_processes > 1:
                from accelerate.utils import gather_object

                for rank, state in enumerate(gather_object([states[name]])):
                    states[f"{name}@{rank}"] = state
        return states

    def _write_checkpoint(self, states: dict[str, Any]) -> Path:
        try:
            path = save_checkpoint(
                self.checkpoint_folder, self.step, states, {**self.meta, "nonfinite_steps": self.nonfinite_steps}
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
        states = self._states()
        return on_main(self.accelerator, lambda: self._write_checkpoint(states))

    def _grad_norm(self, update: Update) -> torch.Tensor:
        """Total gradient norm; clips to max_grad_norm when set. Non-finite iff some gradient is."""
        if update.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_(update.params, update.max_grad_norm)
            if norm is not None:  # DeepSpeed may not report it
                return full_norm(norm)
        else:
            self.accelerator.unscale_gradients()
        grads = [p.grad for p in update.params if p.grad is not None]
        return full_norm(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())

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
            logs = self.out_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "time": round(time.time(), 3), **record}) + "\n")

    def _apply(self, update: Update, micro_batches: list[Any]) -> tuple[torch.Tensor, dict[str, Any], bool]:
        """One update over the step's micro-batches: accumulate, clip, step (or skip when not finite)."""
        acc, accum = self.accelerator, len(micro_batches)
        for other in self.updates:  # an earlier update's loss may have left gradients on this one's parameters
            other.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=acc.device)
        logs: dict[str, Any] = {}
        for micro, batch in enumerate(micro_batches):
            sync = acc.no_sync(update.model) if micro < accum - 1 else nullcontext()
            with sync, acc.autocast():
                loss, logs = update.loss_fn(batch)
                if self.step + 1 in self._nan_steps:  # test hook, see the module docstring
                    loss = loss * float("nan")
                with record_function("train/backward"):
                    acc.backward(loss / accum)
            total_loss += loss.detach() / accum
        with record_function("train/optimizer"):
            finite = self._all_finite(total_loss, self._grad_norm(update))  # clipped when finite
            if finite or getattr(acc, "scaler", None) is not None:
                update.optimizer.step()  # an fp16 loss scaler skips an overflowing update itself and lowers its scale
            update.lr_scheduler.step()  # the schedule stays a function of the step, skipped or not
            update.optimizer.zero_grad(set_to_none=True)
        return total_loss, logs, finite

    def _train_step(self, batches: Iterator[Any]) -> tuple[dict[str, Any], bool]:
        """Every update on this step's micro-batches; returns the losses and logs, and whether all were finite."""
        micro_batches = []
        for _ in range(self.settings.gradient_accumulation_steps):
            with record_function("train/data"):
                micro_batches.append(next(batches))
        losses: dict[str, Any] = {}
        all_finite = True
        for i, update in enumerate(self.updates):
            loss, logs, finite = self._apply(update, micro_batches)
            losses.update({"loss" if i == 0 else f"loss_{update.name}": loss, **logs})
            all_finite = all_finite and finite
        if all_finite and self.on_step_end is not None:
            with record_function("train/on_step_end"):
                self.on_step_end()
        return losses, all_finite

    def _check_nonfinite(self, in_a_row: int, bar: Any) -> None:
        self.nonfinite_steps += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all)",
                    self.step, in_a_row, self.nonfinite_steps)  # fmt: skip
        self._log({"nonfinite": True, "nonfinite_steps": self.nonfinite_steps})
        if in_a_row >= self.settings.max_nonfinite_steps:
            bar.close()
            raise TrainingError(
                f"{in_a_row} consecutive steps with a non-finite loss or gradient (steps "
                f"{self.step - in_a_row + 1}-{self.step}, all skipped): stopped at step {self.step}; the last "
                f"good checkpoint is intact ({self.last_checkpoint()}): lower --learning-rate or check the "
                "data, then continue with --resume latest"
            )

    def _log_step(self, losses: dict[str, Any], rate: float, bar: Any) -> float:
        """Reduce the losses over processes (a device sync: on logging steps only) and log them with the rest."""
        values = {k: float(self.accelerator.reduce(v, "mean")) if k.startswith("loss") else float(v)
                  for k, v in losses.items()}  # fmt: skip
        lr = self.updates[0].lr_scheduler.get_last_lr()[0]
        loss = values.pop("loss")
        self._log({"loss": loss, "lr": lr, "samples_per_s": rate, **values})
        bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2g}", samples_s=f"{rate:.1f}")
        return loss

    def run(self) -> TrainResult:
        s, acc = self.settings, self.accelerator
        start_step, t_start = self.step, time.perf_counter()
        batches = self._batches()
        samples_per_step = s.batch_size * s.gradient_accumulation_steps * acc.num_processes
        bar = tqdm(total=s.max_steps, initial=self.step, desc=self.description, dynamic_ncols=True,
                   disable=not (s.progress and acc.is_local_main_process))  # fmt: skip
        step_times: list[float] = []
        loss_value = None
        in_a_row = 0
        for update in self.updates:
            update.model.train()
        profiler = StepProfiler(s.profile_steps, acc.device.type == "cuda") if s.profile_steps else None
        while self.step < s.max_steps:
            if profiler is not None and self.step == start_step + 1:
                profiler.start()
            t0 = time.perf_counter()
            losses, finite = self._train_step(batches)
            self.step += 1
            step_times.append(time.perf_counter() - t0)
            in_a_row = 0 if finite else in_a_row + 1
            if not finite:
                self._check_nonfinite(in_a_row, bar)
            elif self.step % s.log_every == 0 or self.step == s.max_steps:
                rate = samples_per_step / statistics.median(step_times[-20:])
                loss_value = self._log_step(losses, rate, bar)
            bar.update(1)
            if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                if finite:
                    self.save()
                else:
                    log.warning("step %d: no checkpoint after a skipped non-finite step", self.step)
            if self.callback is not None and self.callback_every and self.step % self.callback_every == 0:
                if acc.is_main_process:
                    self.callback(self.step)
                acc.wait_for_everyone()
            if profiler is not None and profiler.running and self.step == start_step + 1 + s.profile_steps:
                profiler.stop(step_times[-s.profile_steps :], self.out_dir / PROFILE_FILE, acc.is_main_process)
        if profiler is not None and profiler.running:
            profiler.stop(step_times[1:], self.out_dir / PROFILE_FILE, acc.is_main_process)
        bar.close()
        timed = step_times[1:] or step_times  # the first step pays for warm-up
        median = statistics.median(timed) if timed else None
        return TrainResult(
            steps=self.step, start_step=start_step, median_s_per_step=median,
            samples_per_s=samples_per_step / median if median else None, final_loss=loss_value,
            wall_s=time.perf_counter() - t_start, nonfinite_steps=self.nonfinite_steps,
        )  # fmt: skip
