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


def _toy_train_teacher(args: argparse.Namespace) -> int:
    import json
    from dataclasses import fields
    from pathlib import Path

    from .toy.teacher import TeacherRecipe, train_teacher

    if not (Path(args.vae) / "config.json").is_file():
        raise ConfigError(f"--vae {args.vae}: not a trained toy VAE folder (no config.json); train one with "
                          "python -m lcmkit.toy.vae --out DIR --steps N")  # fmt: skip
    given = {f.name: getattr(args, f.name) for f in fields(TeacherRecipe) if getattr(args, f.name, None) is not None}
    summary = train_teacher(TeacherRecipe(**given), resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .toy.demo import DemoSettings, run_demo

    given = {k: v for k, v in vars(args).items() if k in ("out", "mode", "teacher", "steps", "seed") and v is not None}
    settings = DemoSettings.quick(**given) if args.quick else DemoSettings(**given)
    result = run_demo(settings)
    print(result["table"])
    print(f"lcmkit demo: {result['total_s']:.0f} s; grid, metrics and plot in {result['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcmkit", description="Latent Consistency Distillation for SD / SDXL")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="distill a teacher into a full LCM or an LCM-LoRA",
                       description="Options come from --config (TOML) and flags; flags win.")  # fmt: skip
    add_flags(p)
    p.set_defaults(func=_distill)

    d = sub.add_parser("demo", help="distill the shipped toy teacher and compare it with its teacher, offline")
    d.add_argument("--out", default=None, help="output folder (default runs/demo)")
    d.add_argument("--mode", choices=["lora", "full"], default=None)
    d.add_argument("--steps", type=int, default=None, help="distillation steps")
    d.add_argument("--teacher", default=None, help="another toy-world teacher folder")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--quick", action="store_true", help="a smoke-test sized run")
    d.set_defaults(func=_demo)

    toy = sub.add_parser("toy", help="the embedded toy world: build its teacher").add_subparsers(
        dest="toy_command", required=True
    )
    t = toy.add_parser("train-teacher", help="train the tiny toy teacher (resumable; checkpoints in --out)")
    t.add_argument("--out", required=True)
    t.add_argument("--vae", required=True, help="trained toy VAE folder")
    for name, tp in (
        ("steps", int),
        ("batch_size", int),
        ("learning_rate", float),
        ("seed", int),
        ("eval_every", int),
        ("eval_images", int),
        ("num_threads", int),
        ("checkpoint_every", int),
    ):
        t.add_argument("--" + name.replace("_", "-"), type=tp, default=None)  # fmt: skip
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_toy_train_teacher)
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
