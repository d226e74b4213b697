"""Layering: imports inside tpsurgery flow one way, and backends meet a declared contract (no capability probing).

No module imports, directly or through others, a module that imports it. The graph is read from the source (the AST
of every ``tpsurgery/**/*.py``), with imports inside functions counted like top-level ones: a local import only delays
a cycle to run time, it does not remove it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import tpsurgery
from tpsurgery.backends import Backend, ResumableBackend
from tpsurgery.errors import BackendError
from tpsurgery.prompts import Encoded

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
    assert "tpsurgery.batch" in graph["tpsurgery.backends.surgery"]  # `from ..batch import`
    assert "tpsurgery.errors" not in graph["tpsurgery.errors"]


def test_no_import_cycle_inside_tpsurgery():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (local imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


# -- backends: the declared contract (tpsurgery.backends), not capability probing ----------------------------------
def _signature(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _contract_methods(protocol) -> list[str]:
    return sorted(n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_"))


@pytest.fixture(scope="module")
def backends():
    from tpsurgery.backends.nnsight_backend import NNsightBackend
    from tpsurgery.backends.tl_backend import TransformerLensBackend
    from tpsurgery.testing import tiny_model

    model, tok = tiny_model("llama", n_layers=2)
    return NNsightBackend(model), TransformerLensBackend.from_model(model, tok), model


def test_both_backends_meet_the_protocol_with_its_exact_signatures(backends):
    nn, tl, _ = backends
    assert isinstance(nn, ResumableBackend) and isinstance(tl, Backend) and not isinstance(tl, ResumableBackend)
    assert (nn.supports_prefix, tl.supports_prefix) == (True, False)
    assert _contract_methods(Backend) == ["close", "run"] and _contract_methods(ResumableBackend) == ["run_part"]
    for backend, protocols in ((nn, (Backend, ResumableBackend)), (tl, (Backend,))):
        for protocol in protocols:
            for name in _contract_methods(protocol):  # no extra or missing parameters, same defaults
                assert _signature(getattr(type(backend), name)) == _signature(getattr(protocol, name)), (backend, name)


def test_a_backend_without_prefix_support_refuses_a_prefix(backends):
    from tpsurgery.batch import collate
    from tpsurgery.plan import compile_plan
    from tpsurgery.prefix import compute_prefix
    from tpsurgery.recipe import parse_recipe

    _, tl, model = backends
    plan = compile_plan(parse_recipe("prompt: 'This : {text} means'"), tl.n_layers, 32)
    prefix = compute_prefix(model, [1, 2, 3])
    batch = collate([Encoded((4, 5), (), (0, 2))], 0, plan.reach)
    with pytest.raises(BackendError, match="cannot run on a prompt prefix"):
        tl.run(plan, batch, prefix=prefix)
    assert tl.run(plan, batch).shape == (1, 32)
