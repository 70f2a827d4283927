"""`lcmkit presets`: list the shipped distillation presets, or show one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lcmkit.app.flags import Flags, option


@dataclass
class PresetsOptions:
    name: str | None = option(None, positional=True)
    """A preset to show (default: list them all)."""


PRESETS = Flags(PresetsOptions)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("presets", help="list the shipped distillation presets, or show one")
    PRESETS.add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lcmkit.distill.config import list_presets, preset_file

    o: PresetsOptions = PRESETS.build(args)
    if o.name:
        print(preset_file(o.name).read_text(), end="")
        return 0
    presets = list_presets()
    width = max(map(len, presets))
    for name, p in presets.items():
        print(f"{name:<{width}} {p.get('family', '?'):<5} {p['mode']:<5} {p.get('description', '')}")
    print(
        "\nshow one: lcmkit presets NAME; use it: lcmkit distill --preset NAME --teacher ... (flags and --config win)"
    )
    return 0
