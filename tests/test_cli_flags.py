"""The flags of every `lcmkit` command come from dataclasses: each field of a command's options dataclass is a flag
whose parsed default is the field's default, and a field added to a dataclass becomes a flag by itself."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from lcmkit.app.cli import build_parser, main
from lcmkit.app.flags import Flags, Parser, field_default, option
from lcmkit.distill.config import SECTIONS, _section_fields

COMMANDS = {
    "distill", "cache", "serve", "presets", "push", "generate", "export", "info", "eval", "bench distill",
    "bench generate", "bench serve", "bench soak", "demo", "toy train-teacher", "toy train-flow-teacher",
    "toy ship-teacher",
}  # fmt: skip
DISTILL_SECTIONS = {"distill": SECTIONS, "cache": ("model", "data")}
"""The commands whose flags (also) come from distill/config.py's sections, with defaults None (the file wins)."""


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, Parser]:
    """'bench generate' -> its parser, for every command that runs (its deferred flags added)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        assert isinstance(parser, Parser)
        return {" ".join(path): parser.complete()}
    return {k: v for name, sub in subs[0].choices.items() for k, v in leaves(sub, (*path, name)).items()}


def minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """A value for every required argument: the first choice, 1 for numbers, 'x' for text."""
    argv: list[str] = []
    for action in parser._actions:
        if not (action.required or (not action.option_strings and action.nargs != "?")):
            continue
        value = str(action.choices[0]) if action.choices else "1" if action.type in (int, float) else "x"
        argv += [action.option_strings[-1], value] if action.option_strings else [value]
    return argv


def test_every_command_is_covered():
    assert set(leaves(build_parser())) == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_is_a_flag_with_the_field_default(command):
    parser = leaves(build_parser())[command]
    dests = {a.dest: a for a in parser._actions}
    args = parser.parse_args(minimal_argv(parser))
    for name, section in _section_fields().items():
        if section in DISTILL_SECTIONS.get(command, ()):
            assert name in dests and getattr(args, name) is None, f"{command}: [{section}] {name}"
    if command == "distill":
        return
    assert parser.options, f"{command}: no options dataclass"
    for flags in parser.options:
        required = {}
        for f in flags.fields():
            assert f.name in dests, f"{command}: {flags.cls.__name__}.{f.name} has no flag"
            default = field_default(f)
            if default is dataclasses.MISSING:
                required[f.name] = getattr(args, f.name)
            else:
                want = None if f.name in flags.unset else default
                assert getattr(args, f.name) == want, f"{command}: --{f.name} parses to {getattr(args, f.name)!r}"
        given = {f.name: ["a prompt"] for f in dataclasses.fields(flags.cls) if f.name in flags.skip}
        assert flags.build(args, **given) == flags.cls(**required, **given)


@pytest.mark.parametrize("command", ["", "bench", "toy", *sorted(COMMANDS)])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command.split(), "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lcmkit {command}".rstrip())


def test_library_defaults_are_the_flags_defaults():
    from lcmkit.infer.generator import FewStepGenerator
    from lcmkit.infer.sampling import DEFAULT_TCD_GAMMA
    from lcmkit.measure.eval import EvalSettings

    parser = build_parser()
    generate = parser.parse_args(["generate"])
    assert generate.tcd_gamma == DEFAULT_TCD_GAMMA and generate.guidance is None
    assert generate.steps == 4 and generate.scheduler == "lcm" and generate.device == "auto"
    assert inspect.signature(FewStepGenerator.__call__).parameters["steps"].default == generate.steps
    evaluate = parser.parse_args(["eval", "--teacher", "t", "--prompts", "p"])
    assert evaluate.guidance is None and evaluate.teacher_samplers == ("ddim", "dpm++")  # None: the family's
    assert evaluate.size is None and evaluate.progress is True and evaluate.steps is None  # --quick decides
    assert EvalSettings(teacher="t", prompts=["p"]).steps == [1, 2, 4, 8]
    assert parser.parse_args(["bench", "generate", "--teacher", "t"]).guidance is None


def test_flags_parse_into_the_options_of_each_command():
    parser = build_parser()
    a = parser.parse_args(["generate", "--prompt", "a", "--prompt", "b", "--lora", "x:0.5"])
    assert (a.prompt, a.lora) == (["a", "b"], ["x:0.5"])
    a = parser.parse_args(["eval", "--teacher", "t", "--prompts", "p", "--steps", "4,1", "--no-progress",
                           "--resolution", "64", "--teacher-samplers", "dpm++"])  # fmt: skip
    from lcmkit.app.eval import EVAL

    s = EVAL.build(a, prompts=["p"])
    assert (s.steps, s.progress, s.size, s.teacher_samplers) == ([1, 4], False, 64, ("dpm++",))
    a = parser.parse_args(["bench", "distill", "--modes", "lora", "--arch", "sd15"])
    assert (a.modes, a.arch) == (["lora"], "sd15")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "distill", "--modes", "half"])
    a = parser.parse_args(["toy", "train-teacher", "--out", "o", "--unet-channels", "8", "16", "--train-text-encoder"])
    from lcmkit.app.toy import teacher_flags

    recipe = teacher_flags().build(a, vae="v")
    assert (recipe.unet_channels, recipe.train_text_encoder, recipe.steps) == ((8, 16), True, 15000)


def test_quick_presets_stay_under_given_flags():
    """demo parses every flag to None unless given, so --quick sizes only what the user left alone."""
    from lcmkit.app.demo import DEMO
    from lcmkit.toy.demo import DemoSettings

    args = build_parser().parse_args(["demo", "--quick", "--steps", "5", "--no-overwrite"])
    given = DEMO.values(args)
    assert given == {"steps": 5, "overwrite": False}
    settings = DemoSettings.make(True, **given)
    assert (settings.steps, settings.overwrite, settings.n_train, settings.flow) == (5, False, 200, False)
    flow = DemoSettings.make(True, **DEMO.values(build_parser().parse_args(["demo", "--quick", "--flow",
                                                                           "--teacher-steps", "10"])))  # fmt: skip
    assert (flow.flow, flow.teacher_steps, flow.teacher_few_steps, flow.tcd_steps, flow.euler_steps, flow.n_train,
            flow.out) == (True, 10, [1, 2, 4], [], [2, 4], 200, "runs/demo-flow")  # fmt: skip


@dataclass
class Small:
    name: str
    """The name. Only the first sentence is help."""
    count: int = 3
    """How many."""
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    ratio: float | None = None
    fast: bool = False
    """Go fast."""
    quiet: bool = option(False, action="store_true")
    progress: bool = option(True, action="store_false")
    lora: list[str] | None = option(None, action="append", metavar="PATH")
    steps: tuple[int, ...] = option((1, 2), text=lambda s: tuple(int(x) for x in s.split(",")))
    size: int | None = option(None, flag="--resolution", short="-r")


@dataclass
class Bigger(Small):
    extra: int = 7
    """A new option."""


def parser_of(cls: type, **kw) -> tuple[Parser, Flags]:
    parser, flags = Parser(prog="t"), Flags(cls, **kw)
    flags.add(parser)
    return parser, flags


def test_flags_from_a_dataclass():
    parser, flags = parser_of(Small)
    assert flags.build(parser.parse_args(["--name", "n"])) == Small("n")
    args = parser.parse_args(["--name", "n", "--count", "5", "--mode", "b", "--sizes", "3", "4", "--ratio", "0.5",
                              "--fast", "--quiet", "--no-progress", "--lora", "p", "--lora", "q", "--steps", "3,4",
                              "-r", "64"])  # fmt: skip
    assert flags.build(args) == Small("n", 5, "b", [3, 4], 0.5, True, True, False, ["p", "q"], (3, 4), 64)
    assert parser.parse_args(["--name", "n", "--no-fast"]).fast is False
    for bad in (["--count", "5"], ["--name", "n", "--mode", "c"], ["--name", "n", "--count", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    text = " ".join(parser.format_help().split())
    assert "--name NAME The name" in text and "Only the first" not in text
    assert "--count COUNT How many [default 3]" in text and "{a,b}" in text and "--lora PATH" in text
    assert "--sizes SIZES [SIZES ...] [default 1 2]" in text and "--steps STEPS [default 1,2]" in text
    assert "-r RESOLUTION, --resolution RESOLUTION" in text


def test_a_field_added_to_a_dataclass_becomes_a_flag():
    parser, flags = parser_of(Bigger)
    assert "--extra" not in parser_of(Small)[0].format_help()
    assert "--extra EXTRA A new option [default 7]" in " ".join(parser.format_help().split())
    assert flags.build(parser.parse_args(["--name", "n"])) == Bigger("n")
    assert flags.build(parser.parse_args(["--name", "n", "--extra", "9"])).extra == 9


def test_unset_skip_and_given():
    parser, flags = parser_of(Bigger, skip=("lora",), unset=("count",))
    args = parser.parse_args(["--name", "n"])
    assert args.count is None and "lora" not in vars(args)
    assert flags.build(args, lora=["z"]) == Bigger("n", lora=["z"])
    with pytest.raises(TypeError, match="no fields"):
        Flags(Small, spec={"nope": {"help": "x"}})
    with pytest.raises(TypeError, match="unknown keys"):
        option(1, colour="red")


def test_deferred_flags_are_added_when_the_command_is_parsed():
    calls = []
    parser = Parser(prog="t")
    sub = parser.add_subparsers(dest="command", required=True)
    slow = sub.add_parser("slow", help="a command with slow options")
    slow.defer(lambda p: (calls.append(1), p.add_argument("--late", type=int, default=2)))
    sub.add_parser("quick")
    assert "slow" in parser.format_help() and parser.parse_args(["quick"]).command == "quick" and not calls
    assert parser.parse_args(["slow", "--late", "3"]).late == 3 and calls == [1]


def test_building_the_parser_imports_no_heavy_library():
    """`lcmkit --help` stays fast: the server (pydantic, FastAPI), diffusers and transformers load when used."""
    code = ("import sys; from lcmkit.app.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'pydantic', 'fastapi', 'lcmkit.toy.teacher') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
