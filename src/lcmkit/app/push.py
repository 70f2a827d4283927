"""`lcmkit push`: upload a finished distill folder (weights, model card, record, grids) to the Hugging Face hub."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lcmkit.app.flags import Flags, default_of, option
from lcmkit.outputs.hub import push


@dataclass
class PushOptions:
    out: str = option(positional=True)
    """The distill output folder."""
    repo_id: str = option(required=True)
    """E.g. you/sd15-lcm-lora."""
    private: bool = option(default_of(push, "private"), action="store_true")


PUSH = Flags(PushOptions)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("push", help="upload a finished distill folder (weights, model card, record, grids)")
    PUSH.add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    o: PushOptions = PUSH.build(args)
    url = push(Path(o.out), o.repo_id, o.private)
    print(f"lcmkit: pushed {o.out} -> {url}")
    return 0
