"""`lcmkit toy train-teacher|train-flow-teacher|ship-teacher`: build the embedded toy world's teachers.

train-teacher's flags come from toy/teacher.py's TeacherRecipe; that module imports transformers, so they are
added when the command is parsed (Parser.defer), not for every `lcmkit` call."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmkit.app.flags import Flags, Parser, default_of, option
from lcmkit.errors import ConfigError
from lcmkit.toy.ship import ship_teacher

SHIPPED_VAE = Path(__file__).parent.parent / "toy" / "assets" / "vae"
TEACHER_FLAGS: dict[str, dict[str, Any]] = {
    "vae": {"required": False, "default": None, "help": "trained toy VAE folder (default: the shipped one)"},
    "train_text_encoder": {"action": "store_true",
                           "help": "train the CLIP text encoder too (default: frozen at its seeded initialisation)"},
    "unet_channels": {"help": "the UNet's block channels"},
    "max_tokens": {"help": "text positions of the tokenizer and encoder"},
}  # fmt: skip
"""TeacherRecipe's flags that differ from the plain ones."""


@dataclass
class ShipOptions:
    run: str
    """The --out folder of lcmkit toy train-teacher."""
    out: str | None = None
    """Where to put it (default: lcmkit/toy/assets/teacher, or flow_teacher for a flow teacher's run)."""
    eval_images: int = default_of(ship_teacher, "n_eval")
    """Held-out prompts for the card's scores."""
    overwrite: bool = option(default_of(ship_teacher, "overwrite"), action="store_true")
    progress: bool = option(default_of(ship_teacher, "progress"), action="store_false")


SHIP = Flags(ShipOptions)


def teacher_flags() -> Flags:
    from lcmkit.toy.teacher import TeacherRecipe

    return Flags(TeacherRecipe, spec=TEACHER_FLAGS)


def flow_teacher_flags() -> Flags:
    from lcmkit.toy.flow_teacher import FlowTeacherRecipe

    return Flags(FlowTeacherRecipe, spec={"vae": TEACHER_FLAGS["vae"]})


def add_teacher_flags(parser: Parser, flags: Callable[[], Flags] = teacher_flags) -> None:
    flags().add(parser)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def add_flow_teacher_flags(parser: Parser) -> None:
    add_teacher_flags(parser, flow_teacher_flags)


def add_parser(subparsers: Any) -> None:
    toy = subparsers.add_parser("toy", help="the embedded toy world: build its teacher")
    sub = toy.add_subparsers(dest="toy_command", required=True)
    t = sub.add_parser("train-teacher", help="train the tiny toy teacher (resumable; checkpoints in --out)")
    t.defer(add_teacher_flags)
    f = sub.add_parser("train-flow-teacher",
                       help="train the tiny toy flow teacher, an SD3 (resumable; checkpoints in --out)")  # fmt: skip
    f.defer(add_flow_teacher_flags)
    s = sub.add_parser("ship-teacher", help="copy a trained toy teacher into the package with its card and scores")
    SHIP.add(s)
    toy.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    runs: dict[str, Callable[[argparse.Namespace], int]] = {
        "train-teacher": run_train_teacher, "train-flow-teacher": run_train_teacher, "ship-teacher": run_ship_teacher,
    }  # fmt: skip
    return runs[args.toy_command](args)


def run_train_teacher(args: argparse.Namespace) -> int:
    import json

    from lcmkit.toy.teacher import train_teacher

    vae = str(SHIPPED_VAE) if args.vae is None else args.vae
    if not (Path(vae) / "config.json").is_file():
        raise ConfigError(f"--vae {vae}: not a trained toy VAE folder (no config.json); train one with "
                          "python -m lcmkit.toy.vae --out DIR --steps N")  # fmt: skip
    if args.toy_command == "train-flow-teacher":
        from lcmkit.toy.flow_teacher import train_flow_teacher

        recipe = flow_teacher_flags().build(args, vae=vae)
        summary = train_flow_teacher(recipe, resume=not args.no_resume, progress=not args.no_progress)
    else:
        recipe = teacher_flags().build(args, vae=vae)
        summary = train_teacher(recipe, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def run_ship_teacher(args: argparse.Namespace) -> int:
    o: ShipOptions = SHIP.build(args)
    facts = ship_teacher(Path(o.run), Path(o.out) if o.out else None, o.eval_images, o.overwrite, progress=o.progress)
    out = facts["out"]
    print(f"lcmkit: shipped the toy teacher to {out} ({facts['size_mb']:.1f} MB, "
          f"{facts['training']['compute_s'] / 3600:.1f} h of training); its card is {out}/README.md")  # fmt: skip
    return 0
