"""The compiled schedule (tpsurgery.backends.walk) against the recipe: where each ``hidden_states[j]`` is read, that a
layer's input is read before its input edits, and that the last point is the deepest read (nothing after it runs).
The engines' agreement with plain-hook oracles is tested in test_prop_engine / test_prop_backends / test_masks."""

from __future__ import annotations

import pytest

from tpsurgery.backends.walk import SITES, capture_schedule, schedule
from tpsurgery.plan import compile_plan
from tpsurgery.recipe import parse_recipe

N = 5


def plan(exit_layer: int, tp=(0, 3), **extra):
    recipe = {"prompt": "<PST> {text} means", "tp": {"start": tp[0], "stop": tp[1]}, "exit_layer": exit_layer, **extra}
    return compile_plan(parse_recipe(recipe), N, 8)


def flat(s):
    """``[(layer, site, action kind, index)]`` in schedule order."""
    return [(p.layer, p.site, a.kind, a.index) for p in s.points for a in p.actions]


@pytest.mark.parametrize("exit_layer", range(0, N + 1))
@pytest.mark.parametrize("all_layers", [False, True])
def test_reads_are_where_hidden_states_are_and_the_last_point_is_the_deepest_read(exit_layer, all_layers):
    with pytest.warns(UserWarning) if exit_layer < 3 else _nothing():
        p = plan(exit_layer)
    s = schedule(p, all_layers)
    reads = [(layer, site, j) for layer, site, kind, j in flat(s) if kind == "read"]
    want = range(exit_layer + 1) if all_layers else [exit_layer]
    where = {0: (0, "layer_in"), N: (N, "norm")}
    assert reads == [(*where.get(j, (j - 1, "layer_out")), j) for j in want]
    last = s.points[-1]
    assert (last.layer, last.site) == where.get(exit_layer, (exit_layer - 1, "layer_out"))
    assert last.actions[-1].kind == "read"
    order = [(pt.layer, SITES.index(pt.site)) for pt in s.points]
    assert order == sorted(order) and len(set(order)) == len(order)  # execution order, one point per hook point
    # TP [0, 3): an edit of layer i's input for each i < exit, after the read of hidden_states[i] at the same point
    tp = [(layer, j) for layer, site, kind, j in flat(s) if site == "layer_in" and kind == "edit"]
    assert [layer for layer, _ in tp] == [i for i in (0, 1, 2) if i < exit_layer]
    for pt in s.points:
        kinds = [a.kind for a in pt.actions]
        if pt.site == "layer_in" and "read" in kinds and "edit" in kinds:
            assert kinds.index("read") < kinds.index("edit")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_resumed_run_skips_the_layers_before_start_and_keeps_what_it_is_asked_for():
    p = plan(N, tp=(1, 4), placeholder={"init": "zeros"})
    s = schedule(p, True, start=2, keep=(3,))
    f = flat(s)
    assert f[:2] == [(0, "layer", "skip", 0), (1, "layer", "skip", 0)]
    assert not any(site == "embed" or (layer < 2 and kind != "skip") for layer, site, kind, _ in f)
    assert [j for *_, kind, j in f if kind == "read"] == [3, 4, 5]
    assert [(layer, site) for layer, site, kind, j in f if kind == "keep"] == [(2, "layer_out")]


def test_an_auxiliary_run_captures_in_execution_order_and_stops_after_its_last_site():
    recipe = parse_recipe({"prompt": "<PST> {text} means", "runs": {"neg": "{text} is not"}, "edits": [
        {"site": "layer_out", "layers": 3, "rows": "last", "op": "add", "run": "neg"},
        {"site": "layer_in", "layers": 1, "rows": "last", "op": "subtract", "run": "neg"}]})
    s = capture_schedule(compile_plan(recipe, N, 8), "neg")
    assert [(p.layer, p.site, [a.kind for a in p.actions]) for p in s.points] == [
        (1, "layer_in", ["capture"]), (3, "layer_out", ["capture"])]
