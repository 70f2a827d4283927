"""`lcmkit info`: say what a file or folder is (LoRA, pipeline, UNet, checkpoint, run)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lcmkit.app.common import toy_aliases
from lcmkit.app.flags import Flags, option


@dataclass
class InfoOptions:
    path: str = option(positional=True)
    json: bool = option(False, action="store_true")


INFO = Flags(InfoOptions)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="say what a file or folder is (LoRA, pipeline, UNet, checkpoint, run)")
    INFO.add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from lcmkit.formats.info import describe

    o: InfoOptions = INFO.build(args)
    path = toy_aliases(o.path, None)[0]  # 'toy': the shipped toy teacher
    info = {k: v for k, v in describe(path).items() if v is not None}
    if o.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
