"""Checkpoints that hold no pickle: tensors go to safetensors and the rest (optimizer hyperparameters, RNG
states, step) to JSON. Each is written under a temporary name and renamed, then `latest` is replaced atomically,
so a killed run never points at a half-written checkpoint; a failed write (full disk, permissions) removes its
temporary folder and leaves the previous checkpoint as it was.

Test hook (read only by the test suite's subprocesses; unset in normal use): LCMKIT_TEST_PAUSE_IN_CHECKPOINT_AT_STEP=4
sleeps inside checkpoint 4's write, between writing its files and renaming its folder, so that a test can kill the
process in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lcmkit.train.session import TrainingError, _hook_steps

CHECKPOINT_DIR = "checkpoints"


PAUSE_HOOK = "LCMKIT_TEST_PAUSE_IN_CHECKPOINT_AT_STEP"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


class GeneratorState:
    """Makes a torch.Generator checkpointable (one state per process: each process has its own stream)."""

    per_process = True

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


class GlobalRNGState:
    """torch (and CUDA), numpy and Python global RNG states (one per process)."""

    per_process = True

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


def save_checkpoint(folder: Path, step: int, states: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write checkpoint-<step> with `states` (name -> state_dict) atomically and point `latest` at it. On failure
    the temporary folder is removed and the error raised; `latest` and the checkpoints before it are untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".checkpoint-*.tmp-*"):  # left by a killed run (one run per folder: the lock)
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"checkpoint-{step:08d}"
    tmp = folder / f".checkpoint-{step:08d}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        structure = {name: _flatten(state, name, tensors) for name, state in states.items()}
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


def load_checkpoint(path: Path, objects: dict[str, Stateful], rank: int = 0) -> dict[str, Any]:
    """Load every object's state; a per-process object (see `per_process`) takes this process's own, `name@rank`,
    where the checkpoint has one."""
    try:
        record = json.loads((path / "state.json").read_text())
    except ValueError as e:
        raise TrainingError(f"checkpoint {path / 'state.json'} is damaged (not valid JSON: {e})") from None
    try:
        tensors = load_file(path / "state.safetensors")
    except Exception as e:
        from lcmkit.errors import first_line

        raise TrainingError(f"checkpoint {path / 'state.safetensors'} is damaged ({first_line(e)})") from None
    for name, obj in objects.items():
        own = f"{name}@{rank}"
        key = own if getattr(obj, "per_process", False) and own in record["state"] else name
        if key not in record["state"]:
            raise KeyError(f"checkpoint {path} has no state for {name}")
        obj.load_state_dict(_unflatten(record["state"][key], tensors))
    return record


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    if not keep:
        return
    done = sorted(p for p in folder.glob("checkpoint-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
