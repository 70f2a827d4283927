"""Untrusted weight files: safetensors only, pickle only when asked for, and then without code.

Unpickling runs arbitrary code, so a pickle-based file (.ckpt, .pt, .pth, .bin, .pkl) is refused unless the user
passes --allow-pickle; even then it is read with `torch.load(weights_only=True)` (tensors and plain containers
only) and converted to a temporary .safetensors file that the rest of lcmkit reads as usual. A safetensors file
whose header is malformed (truncated, garbage bytes) is refused with one line naming the file, before any
library half-loads it."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from lcmkit.errors import ConfigError, first_line

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def is_pickle(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | Path, what: str) -> ConfigError:
    return ConfigError(f"{what} {path} is a pickle-based file, which can run code when loaded: convert it to "
                       ".safetensors, or pass --allow-pickle if you trust it (it is then read with "
                       "torch.load(weights_only=True))")  # fmt: skip


def check_safetensors(path: str | Path, what: str) -> None:
    """Parse the header (names, dtypes, shapes, offsets against the file size); no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:
        raise ConfigError(
            f"{what} {path} is not a valid .safetensors file ({first_line(e)}): truncated or damaged?"
        ) from None


def load_pickle_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): tensors and plain containers, no code. A checkpoint's nested
    'state_dict' is unwrapped; entries that are not tensors (step counters, ...) are dropped."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"{what} {path} cannot be read as plain weights (weights_only=True): {first_line(e)}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} {path} holds a {type(obj).__name__}, not a dict of weights")
    return {k: v.contiguous() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


_converted_dir: Path | None = None


def _scratch() -> Path:
    global _converted_dir
    if _converted_dir is None:
        _converted_dir = Path(tempfile.mkdtemp(prefix="lcmkit-unpickled-"))
        atexit.register(shutil.rmtree, _converted_dir, True)
    return _converted_dir


def weights_file(path: str | Path, what: str, allow_pickle: bool = False) -> Path:
    """A checked .safetensors path for `path`: itself, or (pickle, allowed) a converted temporary copy with the
    same name stem (so that a LoRA's weight_name still ends in .safetensors)."""
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    if is_pickle(p):
        if not allow_pickle:
            raise refuse_pickle(path, what)
        state = load_pickle_weights(p, what)
        folder = Path(tempfile.mkdtemp(dir=_scratch()))
        converted = folder / f"{p.stem}.safetensors"
        save_file(state, str(converted))
        return converted
    if p.suffix.lower() != ".safetensors":
        raise ConfigError(f"{what} {path} is not a .safetensors file")
    check_safetensors(p, what)
    return p


def check_weights_folder(folder: str | Path, what: str, allow_pickle: bool = False) -> None:
    """A diffusers folder (pipeline, or one model): every .safetensors header parses; a component whose weights
    are only pickle files is refused unless allowed (diffusers and transformers then load them with
    weights_only=True)."""
    root = Path(folder).expanduser()
    components = [root, *(p for p in sorted(root.iterdir()) if p.is_dir())]
    for component in components:
        files = [p for p in component.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
        safe = [p for p in files if p.suffix.lower() == ".safetensors"]
        for p in safe:
            check_safetensors(p, what)
        pickled = [p for p in files if is_pickle(p)]
        if pickled and not safe and not allow_pickle:
            raise refuse_pickle(pickled[0], what)


def lora_file(path: str | Path, allow_pickle: bool = False) -> Path:
    """The checked .safetensors file of a LoRA file or folder (a pickle one, when allowed, converted)."""
    from lcmkit.errors import ConfigError

    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(f.name for f in p.glob("*.safetensors"))
        if not (p / "pytorch_lora_weights.safetensors").is_file():
            hint = f"it has {', '.join(found[:3])}: give that file instead" if found else "it has no .safetensors file"
            raise ConfigError(f"LoRA folder {path} holds no pytorch_lora_weights.safetensors ({hint})")
        p = p / "pytorch_lora_weights.safetensors"
    if not p.is_file():
        raise ConfigError(f"LoRA {path} does not exist (give a .safetensors file or a folder holding "
                          "pytorch_lora_weights.safetensors)")  # fmt: skip
    return weights_file(p, "LoRA", allow_pickle)
