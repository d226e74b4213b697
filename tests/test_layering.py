"""Imports inside tpsurgery flow one way: no module imports, directly or through others, a module that imports it.

The graph is read from the source (the AST of every ``tpsurgery/**/*.py``), with imports inside functions counted
like top-level ones: a local import only delays a cycle to run time, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tpsurgery

PACKAGE = Path(tpsurgery.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("tpsurgery", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: tpsurgery modules it imports}`` over every ``.py`` file under ``root``, local imports included.

    ``from .x import name`` points to ``x.name`` where that is a module of the package, else to ``x``.
    """
    files = {_module_name(p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import tpsurgery.x.y` of a name: the deepest module it names
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges.add(t)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles ``[a, b, ..., a]``: a shortest one through each module that is on any (rotations removed).

    >>> find_cycles({"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}})
    [['a', 'b', 'a'], ['a', 'b', 'c', 'a']]
    >>> find_cycles({"a": {"b"}, "b": set()})
    []
    """
    found = set()
    for start in sorted(graph):
        paths, frontier = {start: [start]}, [start]
        while frontier:  # breadth first: the first way back to `start` is a shortest cycle through it
            back = [v for v in frontier if start in graph.get(v, ())]
            if back:
                cycle = paths[min(back)]
                k = cycle.index(min(cycle))
                found.add(tuple(cycle[k:] + cycle[:k]))
                break
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
    return sorted([*c, c[0]] for c in found)


def test_import_graph_sees_local_and_relative_imports():
    graph = import_graph()
    assert "tpsurgery.backends.nnsight_backend" in graph["tpsurgery.api"]  # imported inside a function
    assert "tpsurgery.plan" in graph["tpsurgery.backends.surgery"]  # `from ..plan import`
    assert "tpsurgery.errors" not in graph["tpsurgery.errors"]


def test_no_import_cycle_inside_tpsurgery():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (local imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)
