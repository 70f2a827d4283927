"""`lcmkit distill`: its flags are generated from the DistillConfig sections (distill/config.py's add_flags)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from lcmkit.app.common import toy_aliases
from lcmkit.distill.config import add_flags

NOT_OPTIONS = ("config", "command", "func", "verbose")
"""Parsed arguments that are not distill options."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("distill", help="distill a teacher into a full LCM or an LCM-LoRA",
                              description="Options come from --config (TOML) and flags; flags win.")  # fmt: skip
    add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lcmkit.distill.config import load_config
    from lcmkit.distill.recipe import distill

    overrides = {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS}
    cfg = load_config(args.config, overrides)
    toy = cfg.model.teacher == "toy"
    cfg.model.teacher = toy_aliases(cfg.model.teacher, None)[0]  # --teacher toy: the shipped toy teacher
    scorers = None
    if toy:  # --watch-quality on the toy world also scores the toy probe metrics (prompt accuracy, probe-FD)
        from lcmkit.toy.demo import toy_scores

        scorers = [toy_scores]
    result = distill(cfg, command=shlex.join(["lcmkit", *sys.argv[1:]]), scorers=scorers)
    if not result.main_process:  # one line per run, not per process
        return 0
    t = result.train
    rate = f", {t.median_s_per_step:.3f} s/step" if t.median_s_per_step else ""
    print(f"lcmkit: {result.mode} {result.family} distillation finished: {t.steps} steps{rate}, "
          f"peak RSS {result.peak_rss_mb:.0f} MB -> {result.out}")  # fmt: skip
    return 0
