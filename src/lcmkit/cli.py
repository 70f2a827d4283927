"""The `lcmkit` command line: parse arguments, call the library, map errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable

from .config import ConfigError, add_flags, load_config

EXIT_USAGE = 2


def _distill(args: argparse.Namespace) -> int:
    from .distill import distill

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "verbose")}
    cfg = load_config(args.config, overrides)
    result = distill(cfg, command=shlex.join(["lcmkit", *sys.argv[1:]]))
    t = result.train
    rate = f", {t.median_s_per_step:.3f} s/step" if t.median_s_per_step else ""
    print(f"lcmkit: {result.mode} {result.family} distillation finished: {t.steps} steps{rate}, "
          f"peak RSS {result.peak_rss_mb:.0f} MB -> {result.out}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcmkit", description="Latent Consistency Distillation for SD / SDXL")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="distill a teacher into a full LCM or an LCM-LoRA",
                       description="Options come from --config (TOML) and flags; flags win.")  # fmt: skip
    add_flags(p)
    p.set_defaults(func=_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="lcmkit: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"lcmkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lcmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # data errors raised inside the run
        from .data.webdataset import DataError

        if isinstance(e, DataError):
            print(f"lcmkit: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
