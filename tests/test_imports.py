"""The import graph of the installed `wsi_pipeline` package has no cycle.

Every module is parsed with `ast` (nothing is imported or run). Every import statement
counts, wherever it is: at module level, inside functions and methods, under
``if TYPE_CHECKING:`` (a type-only import still ties the two modules together; break such a
cycle by moving the shared type, not by hiding it), in ``try``/``except ImportError``.
Edges, between modules of the package only:

- ``import a.b.c`` -> ``a.b.c`` (a package: its ``__init__``);
- ``from a.b import name`` -> ``a.b.name`` when that is a module of the package, else
  ``a.b`` (the package's ``__init__``, which defines ``name``); ``from a.b import *`` ->
  ``a.b``;
- relative imports are resolved against the importing module (its own package for an
  ``__init__``).

Not counted: the implicit import of the parent packages that importing ``a.b.c`` runs
(``a/__init__``, ``a/b/__init__``): a package ``__init__`` that imports its submodules,
which themselves import siblings with ``from . import x``, is the ordinary layout and not a
cycle. Nor are dynamic imports (``importlib.import_module``, entry points), which `ast`
cannot resolve.
"""

from __future__ import annotations

import ast
import importlib.util
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "wsi_pipeline"

# target module -> line of the first import statement of it, per importing module
Graph = Mapping[str, Mapping[str, int]]


def package_modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Every module under the package folder ``root``: name -> (file, is a package)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        if "__pycache__" in rel.parts:
            continue
        parts = [package, *rel.parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        name = ".".join(parts)
        if is_pkg or name not in modules:  # a package shadows a module of the same name
            modules[name] = (path, is_pkg)
    return modules


def _resolve_base(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    """Absolute module named by ``from <level dots><target> import ...`` in ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    if not is_pkg:
        parts.pop()  # a plain module's level-1 base is its package
    if level > 1:
        parts = parts[:-(level - 1)] if level - 1 <= len(parts) else []
    return ".".join([*parts, target] if target else parts)


def import_edges(module: str, path: Path, is_pkg: bool,
                 known: Iterable[str]) -> dict[str, int]:
    """Modules of the package that ``module`` (source at ``path``) imports, with the line of
    the first statement that does."""
    known = set(known)
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in known and target != module:
            edges.setdefault(target, line)

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):  # every statement, in functions and `if` blocks too
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_base(module, is_pkg, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if alias.name != "*" and sub in known else base, node.lineno)
    return dict(sorted(edges.items(), key=lambda kv: kv[1]))


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line} for every module under ``root``."""
    modules = package_modules(root, package)
    return {name: import_edges(name, path, is_pkg, modules)
            for name, (path, is_pkg) in modules.items()}


def cyclic_components(graph: Graph) -> list[list[str]]:
    """The strongly connected components of ``graph`` that hold a cycle (two modules or
    more, or one that imports itself), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):  # Tarjan's algorithm, iterative
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    components.append(sorted(comp))
    return sorted(components)


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle [m0, m1, ..., m0] per cyclic strongly connected component, the shortest
    through the component's first module in sorted order."""
    cycles = []
    for comp in cyclic_components(graph):
        members, first = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier = [first]
        while frontier and first not in prev:  # BFS back to `first` inside the component
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, ())):
                    if child in members and child not in prev:
                        prev[child] = node
                        nxt.append(child)
            frontier = nxt
        path, node = [first], first
        while True:
            node = prev[node]
            path.append(node)
            if node == first:
                break
        cycles.append(path[::-1])
    return cycles


def describe_cycle(cycle: list[str], graph: Graph, root: Path | None = None) -> str:
    """``a (a.py:12) -> b (b.py:3) -> a``: each step with the line of its import."""
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        where = f"line {graph[a][b]}"
        if root is not None:
            rel = a.split(".")[1:]
            f = Path(*rel) if rel else Path("__init__")
            f = f / "__init__.py" if (root / f).is_dir() else f.with_suffix(".py")
            where = f"{f.as_posix()}:{graph[a][b]}"
        steps.append(f"{a} ({where})")
    return " -> ".join([*steps, cycle[-1]])


def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} not installed"
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------- tests


def test_no_import_cycle_in_package():
    t0 = time.perf_counter()
    root = _package_root()
    graph = import_graph(root, PACKAGE)
    components = cyclic_components(graph)
    elapsed = time.perf_counter() - t0
    assert len(graph) > 20 and f"{PACKAGE}.synth.generate" in graph  # it did parse the tree
    report = [f"{len(components)} import cycle(s) in {PACKAGE} (imports inside functions and "
              f"under TYPE_CHECKING count); per tangle of modules, one cycle through it:"]
    for comp, cycle in zip(components, find_cycles(graph), strict=True):
        report.append(f"- {len(comp)} modules: {', '.join(comp)}")
        report.append(f"  {describe_cycle(cycle, graph, root)}")
    assert not components, "\n".join(report)
    # ~0.5 s on 2 shared cores; a generous bound so a loaded machine does not fail it
    assert elapsed < 5.0, f"import-graph check took {elapsed:.2f} s"


def test_find_cycles_on_hand_made_graphs():
    # a -> b -> c -> a plus a tail d -> a; a separate 2-cycle x <-> y; a self-import s -> s
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1},
             "x": {"y": 1}, "y": {"x": 1, "z": 1}, "z": {}, "s": {"s": 1}}
    assert cyclic_components(graph) == [["a", "b", "c"], ["s"], ["x", "y"]]
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["s", "s"], ["x", "y", "x"]]
    # the shortest way round: a -> c -> a, not a -> b -> c -> a
    assert find_cycles({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {"a": 1}}) == [
        ["a", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}, "d": {"a": 1, "c": 1}}) == []
    assert describe_cycle(["a", "b", "a"], {"a": {"b": 3}, "b": {"a": 7}}) == (
        "a (line 3) -> b (line 7) -> a")


def test_graph_counts_every_kind_of_import(tmp_path):
    """A throwaway package whose only cycles go through a function-level import, a
    TYPE_CHECKING import and `from . import submodule`; plain `from . import name` of a
    non-module and parent packages do not make edges."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import helpers\n\ndef f():\n    from .sub import deep\n",
        "helpers.py": "VALUE = 1\n",
        "sub/__init__.py": "from .deep import g\n",
        "sub/deep.py": ("from typing import TYPE_CHECKING\nfrom .. import VALUE_FROM_INIT\n"
                        "if TYPE_CHECKING:\n    from ..b import B\n"),
        "b.py": "import toy.a\nfrom .helpers import VALUE\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg, "toy")
    assert graph == {
        "toy": {"toy.a": 1},
        "toy.a": {"toy.helpers": 1, "toy.sub.deep": 4},
        "toy.b": {"toy.a": 1, "toy.helpers": 2},
        "toy.helpers": {},
        "toy.sub": {"toy.sub.deep": 1},
        "toy.sub.deep": {"toy": 2, "toy.b": 4},
    }
    assert cyclic_components(graph) == [["toy", "toy.a", "toy.b", "toy.sub.deep"]]
    cycles = find_cycles(graph)
    assert cycles == [["toy", "toy.a", "toy.sub.deep", "toy"]]
    assert describe_cycle(cycles[0], graph, pkg) == (
        "toy (__init__.py:1) -> toy.a (a.py:4) -> toy.sub.deep (sub/deep.py:2) -> toy")
