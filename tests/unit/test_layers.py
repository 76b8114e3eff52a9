"""The layers of docs/design.md and /work/shared/STYLE.md, kept true by reading the source.

Every ``rsockd/**/*.py`` is parsed (nothing is imported) and each ``import`` / ``from ... import``
in it becomes an edge of the module graph: at module level, inside ``if TYPE_CHECKING:``,
``try:`` and ``if sys.platform ...`` blocks, and inside functions and methods.

What counts, and why:

- **Module-level cycles fail**, ``TYPE_CHECKING`` imports included: one of the two modules then
  sees the other half-initialised, and under ``TYPE_CHECKING`` the cycle is only hidden from
  the interpreter, not from the reader.
- **Function-level (lazy) imports count too.**  A lazy import is still a dependency: it moves
  the cycle from import time to call time, and a reader still has to understand both modules
  at once.  Lazy imports are for keeping platform libraries (bcc, nftables, macOS ioctls) and
  slow imports out of ``import rsockd``, not for hiding a cycle.  So every cycle of the whole
  graph fails, except those listed in ``KNOWN_CYCLES``.
- **core is pure**: a ``rsockd/core/`` module imports nothing of rsockd outside ``rsockd/core/``
  and ``rsockd/errors.py`` (the standard library is fine), lazily or not.
- **Layer order**: base (``rsockd``, ``errors``, ``caps``, ``logs``, ``netlink``) and core <- steer <-
  dataplane <- service <- cli: a module imports only its own layer or lower ones.  The data
  plane receives what steering hands it (``Receiver``) and uses steering's netlink and classic
  BPF helpers (``rtnl``, ``cbpf``); steering never imports the data plane.  The exceptions of
  today are listed in ``LAYER_EXCEPTIONS``, one line each, with why.

Importing a submodule runs its packages' ``__init__`` first, so an import of ``a.b.c`` is an edge
to ``a.b.c`` and to each of its packages the importer is not itself inside.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "rsockd"

#: Cycles (as the set of their modules) that exist and are being removed, each with why; the
#: test fails when one listed here is gone, so that its line is deleted.  None today: the last
#: one (the worker importing apply_live and relay_status from the daemon that starts it) went with
#: the endpoint change (service/wiring.py, service/status.py).
KNOWN_CYCLES: set[frozenset[str]] = set()

#: Imports against the layer order that are there on purpose: (importer, imported) -> why.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("rsockd.service.daemon", "rsockd.cli.check"):
        "`rsockd --check` is an option of the daemon's own command line (a lazy import in main)",
    ("rsockd.dataplane.relay", "rsockd.service.config"):
        "the relay reads its settings from the service's Config; relay.py is being restructured",
}

#: Layer of each top-level part of the package; a module may import its own layer or lower.
LAYER_OF = {"core": 0, "errors": 0, "caps": 0, "logs": 0, "netlink": 0, "": 0,
            "steer": 1, "dataplane": 2, "service": 3, "cli": 4}
LAYER_NAMES = {0: "base/core", 1: "steer", 2: "dataplane", 3: "service", 4: "cli"}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function or method
    implicit: bool = False  # a package run because a module inside it was imported


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


class _Imports(ast.NodeVisitor):
    """Every import statement of one module, with whether it sits inside a function."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self._depth > 0))


def import_graph(root: Path = ROOT) -> tuple[set[str], list[Edge]]:
    """The package's modules and the import edges between them (imports of anything outside the
    package are left out)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    top = root.name
    edges: list[Edge] = []

    def add(importer: str, target: str, line: int, lazy: bool) -> None:
        if target.split(".")[0] != top:
            return
        # a name imported from a package (``from . import Steering``) is the package itself
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target == importer:
            return
        edges.append(Edge(importer, target, line, lazy))
        parts = target.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if not (importer == package or importer.startswith(package + ".")):
                edges.append(Edge(importer, package, line, lazy, implicit=True))

    for name, path in files.items():
        package = name if _is_package(path) else name.rsplit(".", 1)[0]
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for node, lazy in visitor.found:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(name, alias.name, node.lineno, lazy)
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                anchor = ".".join(base + ([node.module] if node.module else []))
            else:
                anchor = node.module or ""
            for alias in node.names:
                # ``from pkg import sub`` imports the submodule when there is one, else pkg
                sub = f"{anchor}.{alias.name}"
                add(name, sub if sub in modules else anchor, node.lineno, lazy)
    return modules, edges


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """The cycles of ``graph`` as its strongly connected components of two or more nodes, and
    nodes with an edge to themselves (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[frozenset[str]] = []
    nodes = set(graph) | {m for targets in graph.values() for m in targets}

    for start in sorted(nodes):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.add(m)
                    if m == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    out.append(frozenset(component))
    return out


def _graph(edges: Iterable[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    return graph


def _show(cycles: Iterable[frozenset[str]], edges: list[Edge]) -> str:
    lines = []
    for cycle in cycles:
        lines.append(" <-> ".join(sorted(cycle)))
        shown = {(e.importer, e.line, e.imported, e.implicit, e.lazy) for e in edges
                 if e.importer in cycle and e.imported in cycle}
        for importer, line, imported, implicit, lazy in sorted(shown):
            how = "implicit package import" if implicit else ("lazy" if lazy else "module level")
            lines.append(f"    {importer}:{line} imports {imported} ({how})")
    return "\n".join(lines)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else ""]


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Edge]]:
    return import_graph()


# -- the cycle finder itself --------------------------------------------------------------------


def test_cycle_finder_finds_cycles_and_only_cycles() -> None:
    g = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": ["e"], "e": [], "s": ["s"], "x": ["y"], "y": ["x", "a"]}
    assert sorted(map(sorted, find_cycles(g))) == [["a", "b", "c"], ["s"], ["x", "y"]]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []
    # a long chain closing on itself (deeper than Python's recursion limit)
    n = 5000
    chain = {f"m{i}": [f"m{i + 1}"] for i in range(n)} | {f"m{n}": ["m0"]}
    assert find_cycles(chain) == [frozenset(chain)]


def test_graph_builder_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("import os\n\ndef f():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from .sub import X\nfrom .sub.d import D\n")
    (pkg / "sub" / "d.py").write_text("try:\n    from .. import c\nexcept ImportError:\n    pass\nD = 1\n")
    modules, edges = import_graph(pkg)
    assert modules == {"pkg", "pkg.sub", "pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"}
    got = {(e.importer, e.imported, e.lazy, e.implicit) for e in edges}
    assert got == {
        ("pkg.a", "pkg.b", False, False),  # under TYPE_CHECKING
        ("pkg.b", "pkg.a", True, False),  # inside a function, absolute; os is not ours
        ("pkg.c", "pkg.sub", False, False),  # a name from a package is the package
        ("pkg.c", "pkg.sub.d", False, False),
        ("pkg.c", "pkg.sub", False, True),  # pkg.sub.d's package runs first
        ("pkg.sub.d", "pkg.c", False, False),  # inside try
    }
    cycles = find_cycles(_graph(edges))
    assert sorted(map(sorted, cycles)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]
    assert find_cycles(_graph(e for e in edges if not e.lazy)) == [frozenset({"pkg.c", "pkg.sub.d"})]


# -- the tree -----------------------------------------------------------------------------------


def test_graph_covers_the_package(graph: tuple[set[str], list[Edge]]) -> None:
    modules, edges = graph
    assert {"rsockd.core.faketcp", "rsockd.dataplane.platform", "rsockd.steer.choose", "rsockd.cli.ctl"} <= modules
    assert any(e.importer == "rsockd.service.daemon" and e.imported == "rsockd.steer.choose" for e in edges)


def test_no_module_level_import_cycle(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph
    eager = [e for e in edges if not e.lazy]
    cycles = find_cycles(_graph(eager))
    assert not cycles, "import cycles at module level:\n" + _show(cycles, eager)


def test_no_import_cycle_but_the_known_ones(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph
    cycles = set(find_cycles(_graph(edges)))
    new = cycles - KNOWN_CYCLES
    assert not new, "import cycles (lazy imports included):\n" + _show(new, edges)
    gone = KNOWN_CYCLES - cycles
    assert not gone, f"no longer a cycle, delete it from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


def test_core_imports_only_core_and_errors(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph
    bad = [f"{e.importer}:{e.line} imports {e.imported}" for e in edges
           if e.importer.startswith("rsockd.core") and not e.implicit
           and not (e.imported == "rsockd.errors" or e.imported.startswith("rsockd.core"))]
    assert not bad, "rsockd/core/ imports outside rsockd/core/ and rsockd/errors.py:\n" + "\n".join(bad)


def test_layer_order(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph
    upward = {(e.importer, e.imported): e for e in edges if not e.implicit and _layer(e.imported) > _layer(e.importer)}
    bad = [f"{e.importer}:{e.line} ({LAYER_NAMES[_layer(e.importer)]}) imports {e.imported} "
           f"({LAYER_NAMES[_layer(e.imported)]})" for pair, e in sorted(upward.items()) if pair not in LAYER_EXCEPTIONS]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)
    stale = set(LAYER_EXCEPTIONS) - set(upward)
    assert not stale, f"no longer needed, delete from LAYER_EXCEPTIONS: {sorted(stale)}"
