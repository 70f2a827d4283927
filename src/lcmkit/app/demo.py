"""`lcmkit demo`: distill the shipped toy teacher and compare it with its teacher, offline. Flags from
toy/demo.py's DemoSettings, plus --quick."""

from __future__ import annotations

import argparse
from typing import Any

from lcmkit.app.flags import Flags
from lcmkit.toy.demo import DemoSettings

DEMO = Flags(
    DemoSettings,
    spec={
        "out": {"help": "output folder"},
        "mode": {"choices": ("lora", "full")},
        "flow": {"help": "the toy flow teacher (a tiny SD3): its Euler beside the distilled model"},
        "teacher": {"help": "another toy-world teacher folder (default: the shipped one)"},
        "steps": {"help": "distillation steps"},
        "batch_size": {"help": "distillation batch size"},
        "learning_rate": {"help": "of the distillation (quick to converge in the short live run)"},
        "lora_rank": {"help": "rank of the live run's LCM-LoRA"},
        "n_train": {"help": "toy training images"},
        "n_test": {"help": "held-out toy images"},
        "n_eval": {"help": "evaluation prompts (images per column)"},
        "grid_rows": {"help": "prompts shown in grid.png"},
        "lcm_steps": {"help": "step counts of the live LCM columns"},
        "shipped_steps": {"help": "step counts of the shipped LCM-LoRA columns"},
        "tcd_gamma": {"help": "gamma of the TCD columns"},
        "teacher_steps": {"help": "steps of the teacher's reference column (DPM-Solver++; with --flow Euler)"},
        "teacher_few_steps": {"help": "step counts of the teacher's few-step columns"},
        "overwrite": {"help": "replace a previous demo run in --out"},
        "progress": {"help": "progress bars"},
    },
    unset=True,  # --quick sizes what is not given
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="distill the shipped toy teacher and compare it with its teacher, offline")
    DEMO.add(p)
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lcmkit.toy.demo import run_demo

    given = DEMO.values(args)
    settings = DemoSettings.make(args.quick, **given)
    settings.check()
    result = run_demo(settings)
    print(result["table"])
    tcd = f"TCD n: the same model on TCDScheduler (gamma {settings.tcd_gamma:g}); " if settings.tcd_steps else ""
    if settings.euler_steps:
        tcd += "Euler n: the same model on Euler steps over its training grid; "
    sampler = "its own Euler" if settings.flow else "DPM-Solver++"
    print(f"LCM n: distilled in this run ({result['distill_steps']} steps, {result['distill_s']:.0f} s), n sampling "
          f"steps; {tcd}teacher: {sampler} with guidance.")  # fmt: skip
    if result["shipped_lora"]:
        made = result["shipped_lora_steps"]
        print(f"shipped LCM n: {result['shipped_lora']}" + (f" ({made} steps of distillation)" if made else ""))
    print(f"lcmkit demo: {result['total_s']:.0f} s; grid, metrics and plot in {result['out']}")
    return 0
