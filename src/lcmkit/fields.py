"""Dataclass fields as documentation: the attribute docstring under each field (the help of its flag)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the first sentence of its attribute docstring (the string under it), in `cls` or whichever
    dataclass among its bases defines it."""
    docs: dict[str, str] = {}
    for owner in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's text wins
        body = _class_body(owner)
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    text = " ".join(str(after.value.value).split())
                    docs[node.target.id] = re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".")
    return docs


def _class_body(cls: type) -> list[ast.stmt]:
    """The statements of a class, from its module's syntax tree (parsed once per module: inspect.getsource of a
    class would search the module again for each class)."""
    path = cls.__qualname__.split(".")
    if "<locals>" in path:  # a class made in a function: only its own source can say
        return ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    body: list[ast.stmt] = _module_tree(cls.__module__).body
    for name in path:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == name).body
    return body


@functools.cache
def _module_tree(module: str) -> ast.Module:
    return ast.parse(inspect.getsource(sys.modules[module]))
