"""`lcmkit serve`: a real-time generation page (the image follows the prompt as you type).

This module is the command (its options, flags and handler) and stays cheap to import; the server itself
(FastAPI, the request model, the generation service) is app/server.py, imported when the command runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lcmkit.app.common import DTYPES, HOST, MAX_CONNECTIONS, PORT, base_and_loras
from lcmkit.app.flags import Flags, default_of, option
from lcmkit.errors import ConfigError
from lcmkit.infer.generator import FewStepGenerator
from lcmkit.infer.sampling import DEFAULT_TCD_GAMMA
from lcmkit.infer.schedulers import LCM_SAMPLERS

MODEL = FewStepGenerator.__init__


@dataclass
class ServeModelOptions:
    """The model of serve and bench serve; with none, the shipped toy teacher and its LCM-LoRA."""

    base: str | None = None
    """Base model (default with no model: the shipped toy teacher + its LCM-LoRA)."""
    base_config: str | None = None
    """For a single-file base offline: a diffusers folder with its configs."""
    lora: list[str] | None = option(None, action="append", metavar="PATH[:WEIGHT]")
    """The LCM-LoRA (+ style LoRAs)."""
    lcm: str | None = None
    """A full LCM (distill output, pipeline folder or single file)."""
    scheduler: str = option(default_of(MODEL, "scheduler"), choices=LCM_SAMPLERS)
    tcd_gamma: float = DEFAULT_TCD_GAMMA
    """With --scheduler tcd: TCD's gamma in [0, 1]."""
    device: str = default_of(MODEL, "device")
    dtype: str = option(default_of(MODEL, "dtype"), choices=DTYPES)
    compile: bool = option(False, action="store_true")
    """torch.compile the UNet and VAE decoder at start (LoRAs fused; no teacher comparison)."""


@dataclass
class ServeOptions(ServeModelOptions):
    host: str = HOST
    """Bind address (the default serves this machine only)."""
    port: int = PORT
    max_connections: int = MAX_CONNECTIONS
    """Concurrent connections before 503."""


SERVE = Flags(ServeOptions)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="a real-time generation page (the image follows the prompt as you type)")
    SERVE.add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lcmkit.app.server import serve

    o: ServeOptions = SERVE.build(args)
    if not 1 <= o.port <= 65535:
        raise ConfigError(f"--port {o.port}: must be in 1..65535")
    if o.max_connections < 1:
        raise ConfigError(f"--max-connections {o.max_connections}: must be >= 1")
    serve(serve_generator(o), o.host, o.port, o.max_connections, info={"model": o.lcm or o.base})
    return 0


def serve_generator(o: ServeModelOptions) -> FewStepGenerator:
    """The FewStepGenerator of serve / bench serve; no model: the shipped toy teacher and its LCM-LoRA."""
    from pathlib import Path

    base, loras = base_and_loras(o.base, o.lora)
    if not base and not o.lcm:
        assets = Path(__file__).parent.parent / "toy" / "assets"
        if not (assets / "teacher" / "model_index.json").is_file() or not (assets / "lcm_lora").is_dir():
            raise ConfigError("no model given and the shipped toy teacher/LCM-LoRA are not in this build: "
                              "pass --base MODEL --lora LCM_LORA or --lcm FULL_LCM")  # fmt: skip
        base, loras = str(assets / "teacher"), [(str(assets / "lcm_lora"), 1.0)]
    return FewStepGenerator(base, loras, o.lcm, o.scheduler, o.device, o.dtype, o.base_config, compile=o.compile,
                            tcd_gamma=o.tcd_gamma)  # fmt: skip
