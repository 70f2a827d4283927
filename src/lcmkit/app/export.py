"""`lcmkit export`: convert outputs: kohya LoRA keys, a fused pipeline, a single-file checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

from lcmkit.app.common import ALLOW_PICKLE_HELP, toy_aliases
from lcmkit.app.flags import Flags, default_of, option
from lcmkit.errors import ConfigError
from lcmkit.families.single_file import export_single_file
from lcmkit.runtime import PRECISIONS

SINGLE_FILE_DTYPES = {"fp16": PRECISIONS["fp16"], "fp32": PRECISIONS["fp32"], "keep": None}
"""--dtype of single-file: the precision written (keep: that of the pipeline)."""


def dtype_name(dtype: Any) -> str:
    """The --dtype name of a precision export_single_file takes."""
    return next(name for name, value in SINGLE_FILE_DTYPES.items() if value == dtype)


@dataclass
class ExportOptions:
    format: Literal["kohya", "diffusers", "fused", "single-file"] = option(positional=True)
    """kohya: diffusers LoRA -> kohya/webui keys; diffusers: kohya LoRA -> diffusers; fused: base + LoRA -> pipeline
    folder; single-file: pipeline -> original-layout file."""
    input: str = option(positional=True)
    """LoRA file/folder, or a pipeline folder for single-file."""
    out: str
    base: str | None = None
    """For fused and diffusers: the base model the LoRA belongs to."""
    base_config: str | None = None
    """With a single-file base offline: a diffusers folder with its configs."""
    dtype: Literal["fp16", "fp32", "keep"] = dtype_name(default_of(export_single_file, "dtype"))
    """For single-file."""
    allow_pickle: bool = option(False, action="store_true", help=ALLOW_PICKLE_HELP)


EXPORT = Flags(ExportOptions)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="convert outputs: kohya LoRA keys, fused pipeline, single-file checkpoint")
    EXPORT.add(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lcmkit.formats.kohya import export_kohya
    from lcmkit.outputs.export import fuse_lora, import_kohya

    o: ExportOptions = EXPORT.build(args)
    o.base, o.input = toy_aliases(o.base, o.input)  # 'toy': the shipped toy teacher (--base) and LCM-LoRA
    if o.format == "kohya":
        path = export_kohya(o.input, o.out, o.allow_pickle)
    elif o.format == "diffusers":
        if not o.base:
            raise ConfigError("export diffusers needs --base (the model the kohya LoRA was made for)")
        path = import_kohya(o.input, o.out, o.base, o.base_config, o.allow_pickle)
    elif o.format == "fused":
        if not o.base:
            raise ConfigError("export fused needs --base (the model the LoRA was made for)")
        path = fuse_lora(o.base, o.input, o.out, o.base_config, allow_pickle=o.allow_pickle)
    else:
        path = export_single_file(o.input, o.out, dtype=SINGLE_FILE_DTYPES[o.dtype])
    print(f"lcmkit: wrote {path}")
    return 0
