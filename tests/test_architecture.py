"""The import rules of lcmkit, checked by parsing the source (ast), never by importing it.

Every `import` / `from ... import` / relative import anywhere in a file counts, at module level and inside
functions alike (a lazy import must not hide a cycle); only imports under `if TYPE_CHECKING:` are ignored.
An import resolves to the lcmkit module it names: `from lcmkit.pkg import name` goes to `lcmkit.pkg.name`
when that is a module or subpackage, else to `lcmkit.pkg`.

Top-level parts: errors, runtime, core, methods, families, train, data, formats, infer, outputs, measure,
distill, app, toy (a package's __init__ belongs to its part; the root `lcmkit/__init__.py` is part "lcmkit").
Edges inside one part are never forbidden by a rule; the rules are about edges between parts.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = "lcmkit"
SRC_ROOT = Path(__file__).resolve().parent.parent / "src"
SKIP_DIRS: tuple[tuple[str, ...], ...] = (("toy", "assets"),)  # relative to the package directory

# `python -m lcmkit` runs lcmkit/__main__.py, which must import the CLI: it is the app's entry point, not library.
ENTRY_POINTS: tuple[str, ...] = ("lcmkit.__main__",)


class Rule(NamedTuple):
    source: str  # modules named this or under it ...
    forbidden: tuple[str, ...]  # ... may not import a module named one of these or under it ...
    exempt: tuple[str, ...] = ()  # ... unless the importing module is named one of these or under it.


# One line per rule. Edges inside one top-level part are always allowed (core may import core).
RULES: dict[str, Rule] = {
    "core imports nothing of lcmkit": Rule("lcmkit.core", ("lcmkit",)),
    "methods know no family": Rule(
        "lcmkit.methods",
        ("lcmkit.families", "lcmkit.train", "lcmkit.data", "lcmkit.distill", "lcmkit.app", "lcmkit.toy"),
    ),
    "the trainer knows no method": Rule(
        "lcmkit.train", ("lcmkit.methods", "lcmkit.families", "lcmkit.core", "lcmkit.distill")
    ),
    "the library never imports the app": Rule("lcmkit", ("lcmkit.app",), ("lcmkit.app", *ENTRY_POINTS)),
    "the library never imports the toy world": Rule(
        "lcmkit", ("lcmkit.toy",), ("lcmkit.app", "lcmkit.toy", *ENTRY_POINTS)
    ),
}


# ----------------------------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module
    src_file: str  # display paths
    dst_file: str
    line: int
    statement: str

    def describe(self) -> str:
        return f"{self.src_file}:{self.line} -> {self.dst_file}   [{self.statement}]"


@dataclass(frozen=True)
class Unresolved:
    src_file: str
    line: int
    name: str
    statement: str


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)
    unresolved: list[Unresolved] = field(default_factory=list)

    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges:
            adj[e.src].add(e.dst)
        return adj


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def part_of(module: str) -> str:
    """lcmkit.families.unet -> families; lcmkit.errors -> errors; lcmkit -> lcmkit."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def discover_modules(src_root: Path, package: str = PACKAGE) -> dict[str, Path]:
    pkg_dir = src_root / package
    modules: dict[str, Path] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir).parts
        if any(rel[: len(skip)] == skip for skip in SKIP_DIRS):
            continue
        names = [package, *rel[:-1]]
        if rel[-1] != "__init__.py":
            names.append(rel[-1][: -len(".py")])
        modules[".".join(names)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Every import node in the file (any depth), except those under `if TYPE_CHECKING:`."""

    def __init__(self) -> None:
        self.nodes: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.nodes.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.nodes.append(node)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: Mapping[str, Path]) -> list[str]:
    """Fully qualified names this import refers to: a module, or `pkg.name` when the import is `from pkg import name`.

    Returned names are candidates; the caller resolves them against the known modules."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        pieces = package.split(".")
        anchor = ".".join(pieces[: len(pieces) - (node.level - 1)])  # empty when it climbs above the root
        base = ".".join(p for p in (anchor, node.module) if p)
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if alias.name != "*" and sub in known else base)
    return out


def build_graph(src_root: Path = SRC_ROOT, package: str = PACKAGE) -> ImportGraph:
    modules = discover_modules(src_root, package)
    graph = ImportGraph(modules)
    base = src_root.parent

    def show(p: Path) -> str:
        return p.relative_to(base).as_posix()

    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        collector = _ImportCollector()
        collector.visit(tree)
        is_package = path.name == "__init__.py"
        for node in collector.nodes:
            statement = ast.unparse(node)  # one line, even for a parenthesised multi-line import
            seen: set[str] = set()
            for target in _targets(node, module, is_package, modules):
                if not _within(target, package):
                    continue
                if target not in modules:
                    graph.unresolved.append(Unresolved(show(path), node.lineno, target, statement))
                    continue
                if target == module or target in seen:
                    continue
                seen.add(target)
                graph.edges.append(Edge(module, target, show(path), show(modules[target]), node.lineno, statement))
    return graph


def strongly_connected_components(adj: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    nodes = sorted(set(adj) | {d for ds in adj.values() for d in ds})
    succ = {n: sorted(adj.get(n, ())) for n in nodes}
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(succ[node])):
                nxt = succ[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                sccs.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sccs


def find_cycles(adj: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle per cyclic strongly connected component, as [a, b, ..., a]."""
    cycles = []
    for comp in strongly_connected_components(adj):
        members = set(comp)
        start = comp[0]
        if len(comp) == 1 and start not in set(adj.get(start, ())):
            continue
        # BFS inside the component from start back to start.
        prev: dict[str, str] = {}
        queue = deque([start])
        found = False
        while queue and not found:
            node = queue.popleft()
            for nxt in sorted(adj.get(node, ())):
                if nxt not in members:
                    continue
                if nxt == start:
                    prev[start] = node
                    found = True
                    break
                if nxt not in prev:
                    prev[nxt] = node
                    queue.append(nxt)
        path = [start]
        node = prev[start]
        while node != start:
            path.append(node)
            node = prev[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def module_cycle_report(graph: ImportGraph) -> list[str]:
    by_pair: dict[tuple[str, str], list[Edge]] = defaultdict(list)
    for e in graph.edges:
        by_pair[(e.src, e.dst)].append(e)
    reports = []
    for cycle in find_cycles(graph.adjacency()):
        lines = [f"import cycle: {' -> '.join(cycle)}"]
        for a, b in zip(cycle, cycle[1:]):
            lines += [f"    {e.describe()}" for e in by_pair[(a, b)]]
        reports.append("\n".join(lines))
    return reports


def part_cycle_report(graph: ImportGraph) -> list[str]:
    by_parts: dict[tuple[str, str], list[Edge]] = defaultdict(list)
    for e in graph.edges:
        p, q = part_of(e.src), part_of(e.dst)
        if p != q:
            by_parts[(p, q)].append(e)
    adj: dict[str, set[str]] = defaultdict(set)
    for p, q in by_parts:
        adj[p].add(q)
    reports = []
    for cycle in find_cycles(adj):
        lines = [f"cycle between parts: {' -> '.join(cycle)}"]
        for a, b in zip(cycle, cycle[1:]):
            lines.append(f"  {a} -> {b}:")
            lines += [f"    {e.describe()}" for e in by_parts[(a, b)]]
        reports.append("\n".join(lines))
    return reports


def rule_violations(graph: ImportGraph, rule: Rule) -> list[Edge]:
    return [
        e
        for e in graph.edges
        if _within(e.src, rule.source)
        and not any(_within(e.src, x) for x in rule.exempt)
        and part_of(e.src) != part_of(e.dst)
        and any(_within(e.dst, f) for f in rule.forbidden)
    ]


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    g = build_graph()
    assert len(g.modules) > 20 and g.edges, f"found no lcmkit sources under {SRC_ROOT}"
    return g


def test_lcmkit_imports_resolve(graph: ImportGraph) -> None:
    """An lcmkit import naming no module would drop its edge silently and hide a violation."""
    bad = [f"    {u.src_file}:{u.line} -> {u.name} (no such module)   [{u.statement}]" for u in graph.unresolved]
    if bad:
        pytest.fail("imports of lcmkit modules that do not exist:\n" + "\n".join(bad), pytrace=False)


def test_no_module_import_cycles(graph: ImportGraph) -> None:
    reports = module_cycle_report(graph)
    if reports:
        pytest.fail("\n".join(reports), pytrace=False)


def test_top_level_parts_form_a_dag(graph: ImportGraph) -> None:
    reports = part_cycle_report(graph)
    if reports:
        pytest.fail("\n".join(reports), pytrace=False)


@pytest.mark.parametrize("name", list(RULES))
def test_import_rule(graph: ImportGraph, name: str) -> None:
    rule = RULES[name]
    assert any(_within(m, rule.source) for m in graph.modules), f"rule {name!r}: no module under {rule.source}"
    bad = rule_violations(graph, rule)
    if bad:
        pytest.fail(f"rule {name!r} broken:\n" + "\n".join(f"    {e.describe()}" for e in bad), pytrace=False)


# ------------------------------------------------------------------------------- the checker itself can fail


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_reports_cycles_and_forbidden_edges(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "lcmkit/__init__.py": "",
            "lcmkit/errors.py": "",
            "lcmkit/core/__init__.py": "from .solver import step\n",
            # a lazy import inside a function closes a module cycle core.solver <-> core.schedule
            "lcmkit/core/solver.py": "from lcmkit.core import schedule\n",
            "lcmkit/core/schedule.py": "def f():\n    from . import solver\n    return solver\n",
            # a forbidden edge core -> train, and a part cycle core -> train -> core
            "lcmkit/core/prediction.py": "import lcmkit.train.loop\n",
            "lcmkit/train/__init__.py": "",
            "lcmkit/train/loop.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from lcmkit.methods import lcd\n"  # ignored
                "from ..core.prediction import x\n"
                "from lcmkit import nothing_here\n"
            ),
            "lcmkit/methods/__init__.py": "",
            "lcmkit/methods/lcd.py": "from lcmkit.train.loop import run\n",
            "lcmkit/data.py": "from lcmkit.gone import x\nimport lcmkit.app\n",
            "lcmkit/app/__init__.py": "from lcmkit.toy import world\n",
            "lcmkit/toy/__init__.py": "",
            "lcmkit/toy/world.py": "",
            "lcmkit/toy/assets/skipped.py": "import lcmkit.app\n",
        },
    )
    g = build_graph(tmp_path)
    assert "lcmkit.toy.assets.skipped" not in g.modules
    edges = {(e.src, e.dst) for e in g.edges}
    assert ("lcmkit.core.schedule", "lcmkit.core.solver") in edges  # relative + lazy
    assert ("lcmkit.core.solver", "lcmkit.core.schedule") in edges  # `from pkg import submodule`
    assert ("lcmkit.train.loop", "lcmkit.core.prediction") in edges  # level-2 relative
    assert ("lcmkit.train.loop", "lcmkit") in edges  # `from lcmkit import name` that is no module
    assert ("lcmkit.app", "lcmkit.toy.world") in edges
    assert not any(e.dst.startswith("lcmkit.methods") for e in g.edges if e.src == "lcmkit.train.loop")
    assert [(u.src_file, u.name) for u in g.unresolved] == [(f"{tmp_path.name}/lcmkit/data.py", "lcmkit.gone")]

    module_reports = module_cycle_report(g)
    assert len(module_reports) == 2, module_reports
    text = "\n".join(module_reports)
    assert "lcmkit.core.schedule -> lcmkit.core.solver -> lcmkit.core.schedule" in text
    assert "lcmkit/core/schedule.py:2 -> " in text and "lcmkit/core/solver.py   [from . import solver]" in text
    assert "lcmkit.core.prediction -> lcmkit.train.loop -> lcmkit.core.prediction" in text

    part_reports = part_cycle_report(g)
    assert len(part_reports) == 1 and "core -> train -> core" in part_reports[0], part_reports

    core = rule_violations(g, RULES["core imports nothing of lcmkit"])
    assert [(e.src, e.dst, e.statement) for e in core] == [
        ("lcmkit.core.prediction", "lcmkit.train.loop", "import lcmkit.train.loop")
    ]
    assert "lcmkit/core/prediction.py:1 -> " in core[0].describe()
    methods = rule_violations(g, RULES["methods know no family"])
    assert [(e.src, e.dst) for e in methods] == [("lcmkit.methods.lcd", "lcmkit.train.loop")]
    train = rule_violations(g, RULES["the trainer knows no method"])
    assert [(e.src, e.dst) for e in train] == [("lcmkit.train.loop", "lcmkit.core.prediction")]
    app = rule_violations(g, RULES["the library never imports the app"])
    assert [(e.src, e.dst) for e in app] == [("lcmkit.data", "lcmkit.app")]
    assert rule_violations(g, RULES["the library never imports the toy world"]) == []  # app may import toy


def test_find_cycles_on_a_synthetic_graph() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    cycles = find_cycles({"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}})
    assert sorted(cycles) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    deep = {str(i): {str(i + 1)} for i in range(5000)}  # no recursion limit
    deep["5000"] = {"0"}
    assert len(find_cycles(deep)) == 1 and len(find_cycles(deep)[0]) == 5002


MAX_FUNCTION_LINES = 100


def long_functions(src_root: Path = SRC_ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:line name (N lines)' for every function longer than `limit` lines outside toy/."""
    found = []
    for path in sorted((src_root / PACKAGE).rglob("*.py")):
        if "toy" in path.relative_to(src_root / PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(src_root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_outside_toy_is_over_100_lines() -> None:
    too_long = long_functions()
    assert not too_long, "split these functions:\n" + "\n".join(too_long)


def test_long_functions_are_found(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    _write(tmp_path, {"lcmkit/__init__.py": "", "lcmkit/big.py": f"def big():\n{body}\n",
                      "lcmkit/toy/__init__.py": "", "lcmkit/toy/huge.py": f"def huge():\n{body}\n"})  # fmt: skip
    assert [line.split()[1] for line in long_functions(tmp_path)] == ["big"]
