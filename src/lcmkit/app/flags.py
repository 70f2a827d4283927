"""Command-line flags from dataclasses, and back: the options of every `lcmkit` command are defined once, as
dataclass fields with their defaults and attribute docstrings, and the flags are generated from them.

    @dataclass
    class InfoOptions:
        path: str = option(positional=True)
        '''A file or folder.'''
        json: bool = option(False, action="store_true")

    INFO = Flags(InfoOptions)
    INFO.add(parser)                # --json, PATH; help from the docstrings, defaults shown
    options = INFO.build(args)      # InfoOptions(path=..., json=...)

Per field: the flag is `--field-name`; its type comes from the annotation (`X | None` -> X, `list[X]` or
`tuple[X, ...]` -> nargs '+', `Literal[...]` -> choices, bool -> --x/--no-x); its help is the first sentence of the
field's attribute docstring (as distill/config.py reads them) followed by the default; a field without a default is
required. A field's metadata (`option(...)`) or the command's `spec` (for a library's dataclass, whose fields carry
no flag metadata) changes that, with these keys:

    flag        the flag's name, e.g. "--resolution" for a field `size`
    short       a short form, e.g. "-n"
    positional  a positional argument (optional, nargs '?', when the field has a default)
    help        replaces the docstring
    choices     the allowed values (default: those of a Literal annotation)
    action      "store_true" (default False), "store_false" (default True; the flag is --no-field-name) or
                "append" (repeatable: one value per use)
    metavar     the value's name in the help
    required    whether the flag must be given (default: the field has no default)
    default     the parsed default of a field that has none (the command fills it in)
    text        a function of the flag's text to the field's value (e.g. "1,2,4" -> [1, 2, 4]), called in
                build(), so that a ConfigError it raises is an ordinary one-line error

The parsed value of every flag lands in `args.<field name>`. Flags(..., unset=True) parses every flag to None
unless it is given (the dataclass default then applies in build()), for a handler that must know which options
were given (a --quick preset under explicit flags); unset=("name", ...) does so for those fields only.

Parser is an ArgumentParser whose flags may be added on first use, for a command whose options live in a module
that is slow to import: `lcmkit --help` and the other commands do not pay for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from lcmkit.distill.config import _base_type
from lcmkit.fields import field_docs

MISSING = dataclasses.MISSING
SPEC_KEYS = frozenset(
    {"flag", "short", "positional", "help", "choices", "action", "metavar", "required", "default", "text"}
)
ACTIONS = (None, "store_true", "store_false", "append")


def option(default: Any = MISSING, *, factory: Callable[[], Any] | Any = MISSING, **spec: Any) -> Any:
    """A dataclass field whose flag differs from the plain one (see the module docstring for `spec`)."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise TypeError(f"option(): unknown keys {sorted(unknown)}")
    return dataclasses.field(default=default, default_factory=factory, metadata=spec)


def default_of(func: Callable[..., Any], name: str) -> Any:
    """The default of parameter `name` of a library function: a command's default that is the library's own."""
    default = inspect.signature(func).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{func.__qualname__}: parameter {name} has no default")
    return default








def base_type(tp: Any) -> tuple[Any, bool, tuple[Any, ...] | None]:
    """(value type, takes several values, Literal choices) of an annotation such as `int | None`, `list[str]`,
    `tuple[int, ...]` or `Literal["a", "b"]`."""
    inner, many = _base_type(tp)
    if typing.get_origin(inner) is tuple:
        inner, many = typing.get_args(inner)[0], True
    choices = None
    if typing.get_origin(inner) is typing.Literal:
        choices = typing.get_args(inner)
        inner = type(choices[0])
    return inner, many, choices


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default (its factory called), or MISSING."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def shown_default(value: Any, sep: str = " ") -> str:
    """A default as the help shows it ('' for none worth showing)."""
    if value is MISSING or value is None or value is False or value in ("", [], ()):
        return ""
    if isinstance(value, list | tuple):
        return sep.join(map(str, value))
    return str(value)


def flag_name(name: str, spec: Mapping[str, Any]) -> str:
    """--field-name, --no-field-name for a store_false field, or the spec's flag."""
    if spec.get("flag"):
        return str(spec["flag"])
    return ("--no-" if spec.get("action") == "store_false" else "--") + name.replace("_", "-")


class Flags:
    """The flags of one options dataclass: add them to a parser, build the dataclass from the parsed args."""

    def __init__(
        self, cls: type, spec: Mapping[str, Mapping[str, Any]] | None = None, skip: Collection[str] = (),
        unset: bool | Collection[str] = False,
    ) -> None:  # fmt: skip
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self.skip = frozenset(skip)
        names = {f.name for f in dataclasses.fields(cls)}
        self.unset = names if unset is True else frozenset(unset or ())
        extra = (set(spec or {}) | set(self.skip) | set(self.unset)) - names
        if extra:
            raise TypeError(f"{cls.__name__} has no fields {sorted(extra)}")
        for name, keys in (spec or {}).items():
            if set(keys) - SPEC_KEYS:
                raise TypeError(f"{cls.__name__}.{name}: unknown keys {sorted(set(keys) - SPEC_KEYS)}")
        self.spec = {f.name: {**f.metadata, **(spec or {}).get(f.name, {})} for f in dataclasses.fields(cls)}

    def fields(self) -> list[dataclasses.Field[Any]]:
        """The fields that have a flag (all but `skip`)."""
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.skip]

    def add(self, parser: argparse.ArgumentParser) -> None:
        """One flag (or positional argument) per field, in field order."""
        hints = typing.get_type_hints(self.cls)
        docs = field_docs(self.cls)
        for f in self.fields():
            names, kwargs = self._argument(f, hints[f.name], docs.get(f.name, ""))
            parser.add_argument(*names, **kwargs)
        if isinstance(parser, Parser):
            parser.options.append(self)

    def _argument(self, f: dataclasses.Field[Any], tp: Any, doc: str) -> tuple[list[str], dict[str, Any]]:
        """(names, add_argument keywords) of one field."""
        spec = self.spec[f.name]
        action = spec.get("action")
        if action not in ACTIONS:
            raise TypeError(f"{self.cls.__name__}.{f.name}: action {action!r}: choose one of {ACTIONS[1:]}")
        inner, many, literal = base_type(tp)
        if spec.get("text") is not None:  # one text, turned into the value by build()
            inner, many = str, False
        default = field_default(f)
        kw: dict[str, Any] = {"default": spec.get("default", None if default is MISSING else default)}
        if f.name in self.unset:
            kw["default"] = None
        if spec.get("choices", literal) is not None:
            kw["choices"] = list(spec.get("choices", literal))
        if inner is bool and not many and action != "append":
            kw["action"] = action or argparse.BooleanOptionalAction
        elif action is not None and action != "append":
            raise TypeError(f"{self.cls.__name__}.{f.name}: action {action} needs a bool field")
        else:
            kw.update(type=inner, action=action, nargs="+" if many and action is None else None)
        kw["help"] = self._help(spec, doc, default, kw)
        kw["metavar"] = spec.get("metavar")
        if spec.get("positional"):
            kw["nargs"] = "?" if default is not MISSING else kw.get("nargs")
            return [f.name], {k: v for k, v in kw.items() if v is not None or k == "default"}
        flag = flag_name(f.name, spec)
        if kw["metavar"] is None and "choices" not in kw and kw.get("type") is not None:
            kw["metavar"] = flag.removeprefix("--").replace("-", "_").upper()  # the flag's, when it is not the field's
        kw["required"] = spec.get("required", default is MISSING and "default" not in spec)
        names = [spec["short"], flag] if spec.get("short") else [flag]
        return names, {"dest": f.name, **{k: v for k, v in kw.items() if v is not None or k == "default"}}

    @staticmethod
    def _help(spec: Mapping[str, Any], doc: str, default: Any, kw: Mapping[str, Any]) -> str | None:
        """The spec's help or the docstring, then the default (not for on/off flags: argparse shows
        BooleanOptionalAction's own; a store_true flag is off)."""
        shown = shown_default(default, "," if spec.get("text") is not None else " ")
        if kw.get("action") in ("store_true", "store_false") or (
            kw.get("action") is argparse.BooleanOptionalAction and kw["default"] is not None
        ):
            shown = ""
        text = spec.get("help", doc) + (f" [default {shown}]" if shown else "")
        return text.strip().replace("%", "%%") or None

    def values(self, args: argparse.Namespace, **given: Any) -> dict[str, Any]:
        """The fields' values from the parsed `args` (None = not given, under unset=True), overridden by `given`."""
        hints = typing.get_type_hints(self.cls)
        values: dict[str, Any] = {}
        for f in self.fields():
            if f.name in given or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if value is None and f.name in self.unset:
                continue
            text = self.spec[f.name].get("text")
            if text is not None and isinstance(value, str):
                value = text(value)
            elif isinstance(value, list) and _is_tuple(hints[f.name]):
                value = tuple(value)
            values[f.name] = value
        return {**values, **given}

    def build(self, args: argparse.Namespace, **given: Any) -> Any:
        """The options dataclass from the parsed `args`; `given` sets fields (e.g. those in `skip`)."""
        return self.cls(**self.values(args, **given))


def _is_tuple(tp: Any) -> bool:
    """Whether an annotation is `tuple[...]` or `tuple[...] | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) is tuple


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that records the Flags added to it (`options`) and may add flags on first use (`defer`):
    when it parses or shows its help. Subparsers made from it are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options: list[Flags] = []
        self._deferred: list[Callable[[Parser], None]] = []

    def defer(self, add: Callable[[Parser], None]) -> None:
        """Call `add(self)` the first time this parser parses or formats its help (e.g. to import a slow module)."""
        self._deferred.append(add)

    def complete(self) -> Parser:
        """Add the deferred flags now."""
        while self._deferred:
            self._deferred.pop(0)(self)
        return self

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()
