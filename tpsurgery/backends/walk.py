"""One layer walk for every engine: a plan's schedule, compiled once, that each engine only maps to its hook points.

:func:`schedule` compiles a plan into :class:`Point` values in execution order: ``(layer, site, actions)``, each
action an ``edit`` (the plan's edits of that site and layer), a ``read`` (``hidden_states[j]``, pooled), a ``keep``
(``hidden_states[j]`` whole, for a resumed run of a shared sweep), a ``capture`` (rows an auxiliary run provides), a
``mask`` (the layer's attention mask replaced) or a ``skip`` (a resumed run: the layer does not run). The last point
stops the run: later layers, the final norm (unless it is read) and the LM head never run. An engine (the nnsight
trace, the hook fast path, TransformerLens) maps each site to its hook point (one table per engine) and hands the
tensor it finds there to :meth:`Walk.at`, which applies the actions and returns the tensor the model goes on with.

>>> from tpsurgery.plan import compile_plan
>>> from tpsurgery.recipe import parse_recipe
>>> plan = compile_plan(parse_recipe("prompt: '<PST> {text}'\\ntp: {start: 1, stop: 3}\\nexit_layer: 3"), 4, 8)
>>> for p in schedule(plan).points:
...     print(p)
layer 1 layer_in: edit(tp)
layer 2 layer_in: edit(tp)
layer 2 layer_out: read hidden_states[3]
>>> [str(p) for p in schedule(plan, all_layers=True).points][:2]
['layer 0 layer_in: read hidden_states[0]', 'layer 0 layer_out: read hidden_states[1]']
>>> schedule(plan, all_layers=True, start=1, keep=(2,)).points[:3]   # resumed at layer 1, hands back hidden_states[2]
(layer 0 layer: skip, layer 1 layer_in: edit(tp), layer 1 layer_out: keep hidden_states[2], read hidden_states[2])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from einops import rearrange
from jaxtyping import Float

from ..edits import Edit, Rows
from ..errors import BackendError
from ..batch import Batch
from ..plan import Plan
from .pooling import combine, pool
from .surgery import apply_edits, capture

# hook points in execution order ("layer": the whole decoder layer, skipped by a resumed run; "norm": the final norm)
SITES = ("embed", "layer", "attn_mask", "layer_in", "attn_out_in", "layer_out", "norm")
Key = tuple  # (run, site, layer, rows): the rows an auxiliary run provides to an add / subtract edit


class Stop(Exception):
    """Raised by a hook engine after the last point: nothing after it runs."""


@dataclass(frozen=True)
class Action:
    """One thing done at a hook point: ``kind`` is ``edit`` (``edits``), ``read`` / ``keep`` (``hidden_states``
    index ``index``), ``capture`` (``key``), ``mask`` (``edits``: the layer's mask edits) or ``skip``."""

    kind: str
    edits: tuple[Edit, ...] = ()
    index: int = 0
    key: Key = ()

    def __str__(self) -> str:
        if self.kind == "edit" or self.kind == "mask":
            return f"{self.kind}({', '.join(dict.fromkeys(e.field for e in self.edits))})"
        if self.kind in ("read", "keep"):
            return f"{self.kind} hidden_states[{self.index}]"
        return f"capture {self.key[0]!r} rows {self.key[3]}" if self.kind == "capture" else self.kind


@dataclass(frozen=True)
class Point:
    """What happens at ``site`` of decoder layer ``layer`` (``embed``: layer 0; ``norm``: layer ``n_layers``)."""

    layer: int
    site: str
    actions: tuple[Action, ...]

    @property
    def field(self) -> str:
        """The recipe field of the point's first edit (error messages)."""
        return next((e.field for a in self.actions for e in a.edits), "edits")

    def __str__(self) -> str:
        return f"layer {self.layer} {self.site}: {', '.join(map(str, self.actions))}"

    __repr__ = __str__


@dataclass(frozen=True)
class Schedule:
    """The points of one run in execution order (the last one stops it) and the ``hidden_states`` indices it reads,
    in read order."""

    points: tuple[Point, ...]
    reads: tuple[int, ...] = ()


def read_layers(plan: Plan, all_layers: bool = False, start: int = 0) -> tuple[int, ...]:
    """The ``hidden_states`` indices a run reads: every layer ``0..M`` with ``all_layers`` (``start + 1..M`` for a
    run resumed at ``start``), else those the embedding is made of (``plan.read_layers``)."""
    if all_layers:
        return tuple(range(start + 1 if start else 0, plan.exit_layer + 1))
    return tuple(plan.read_layers)


def read_point(j: int, n_layers: int) -> tuple[int, str]:
    """Where ``hidden_states[j]`` is: layer 0's input (after the embedding edits, before layer 0's), the final norm's
    output, or decoder layer ``j - 1``'s output (after its edits)."""
    if j == 0:
        return 0, "layer_in"
    return (n_layers, "norm") if j == n_layers else (j - 1, "layer_out")


def _order(layer: int, site: str, action: Action) -> tuple[int, int, int]:
    # a layer's input is read before that layer's input edits; every other site's reads see its edits
    before = site == "layer_in" and action.kind in ("read", "keep")
    return layer, SITES.index(site), 0 if before else 1


def _points(actions: Sequence[tuple[int, str, Action]]) -> tuple[Point, ...]:
    """Actions grouped by hook point, both in execution order (the sort is stable: reads keep their order)."""
    ordered = sorted(actions, key=lambda x: _order(*x))
    points: list[Point] = []
    for layer, site, action in ordered:
        if points and (points[-1].layer, points[-1].site) == (layer, site):
            points[-1] = Point(layer, site, points[-1].actions + (action,))
        else:
            points.append(Point(layer, site, (action,)))
    return tuple(points)


@functools.lru_cache(maxsize=256)
def schedule(plan: Plan, all_layers: bool = False, start: int = 0, keep: tuple[int, ...] = ()) -> Schedule:
    """The schedule of a run of ``plan`` (cached: compiled once per plan and kind of run).

    ``start > 0``: decoder layers ``< start`` are skipped (the embedding edits and theirs do not happen); ``keep``:
    ``hidden_states`` indices to hand back whole (``start < j < exit_layer``), before the plan's edits of layer ``j``.
    """
    n = plan.n_layers
    acts: list[tuple[int, str, Action]] = [(i, "layer", Action("skip")) for i in range(start)]
    by_site: dict[tuple[int, str], list[Edit]] = {}
    for e in plan.edits:
        if e.layer >= start and not (start and e.site == "embed"):
            by_site.setdefault((e.layer, e.site), []).append(e)
    for (layer, site), edits in by_site.items():
        acts.append((layer, site, Action("mask" if site == "attn_mask" else "edit", tuple(edits))))
    reads = read_layers(plan, all_layers, start)
    for j in sorted(set(reads) | set(keep)):
        layer, site = read_point(j, n)
        if j in keep:  # before the read: the kept tensor is not the pooled copy's input either way
            acts.append((layer, site, Action("keep", index=j)))
        if j in reads:
            acts.append((layer, site, Action("read", index=j)))
    return Schedule(_points(acts), tuple(sorted(reads)))


@functools.lru_cache(maxsize=256)
def capture_schedule(plan: Plan, run: str) -> Schedule:
    """The schedule of auxiliary run ``run``: it captures the rows the plan's ``add`` / ``subtract`` edits take from
    it and stops after the last site it provides (no edits happen in it)."""
    return Schedule(_points([(layer, site, Action("capture", key=(run, site, layer, rows)))
                             for site, layer, rows in plan.captures(run)]))


@dataclass
class Walk:
    """The state of one run along a schedule: what its reads, keeps and captures collected.

    ``captured``: rows of auxiliary runs the edits read; ``masks``: ``{layer: mask}`` for the ``mask`` points (in the
    format the engine's attention takes).
    """

    plan: Plan
    batch: Batch
    captured: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    reads: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)

    def at(self, point: Point, h: Float[torch.Tensor, "b l w"]) -> Float[torch.Tensor, "b l w"]:
        """Apply ``point``'s actions to the hidden state found there; returns what the model goes on with (``h``
        itself when nothing was edited)."""
        for a in point.actions:
            if a.kind == "edit":
                h = apply_edits(h, a.edits, self.batch, self.captured, self.plan.n_heads)
            elif a.kind == "read":  # a copy (last-token pooling is a view): later in-place writes at this point
                self.reads.append(pool(h, self.plan, self.batch).clone())  # (hooks, a user's trace) come after it
            elif a.kind == "keep":
                self.kept[a.index] = h.clone()
            elif a.kind == "capture":
                self.captured[a.key] = capture(h, a.key[3], self.batch)
        return h

    def hook(self, point: Point, last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn(h)`` for a hook engine: :meth:`at`, then :class:`Stop` after the last point."""
        def fn(h: torch.Tensor) -> torch.Tensor:
            h = self.at(point, h)
            if last:
                raise Stop
            return h

        return fn

    def result(self, plan_schedule: Schedule, all_layers: bool, where: str) -> Float[torch.Tensor, "b *n d"]:
        """``[B, d]`` (the reads of ``plan.read_layers`` combined), or ``[B, n, d]`` every read with ``all_layers``
        (a ``device_map``'ed model reads each layer on its own device: all go to the first one's)."""
        if len(self.reads) != len(plan_schedule.reads):
            raise BackendError(f"expected {len(plan_schedule.reads)} reads, got {len(self.reads)}: a hook did not "
                               f"fire on {where}")
        reads = [r.to(self.reads[0].device) for r in self.reads]
        if all_layers:
            return torch.stack(reads, 1)
        by_index = dict(zip(plan_schedule.reads, reads))  # reads come in execution order; combine takes read_layers'
        return combine([by_index[j] for j in self.plan.read_layers], self.plan)


Engine = Callable[[Schedule, Walk, dict], None]  # runs the model once along a schedule: (schedule, state, kwargs)


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The forward arguments of a plain run of ``batch`` (on the device its tensors are on)."""
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)


def run_captures(engine: Engine, plan: Plan, batch: Batch) -> dict:
    """Each auxiliary run of ``plan`` on ``batch``'s sentences (:meth:`Batch.other`), along its capture schedule with
    ``engine``: the rows the plan's ``add`` / ``subtract`` edits take from them (``{}`` without auxiliary runs)."""
    captured: dict = {}
    for run, _ in plan.runs:
        aux = batch.other(run)
        state = Walk(plan, aux)
        engine(capture_schedule(plan, run), state, model_inputs(aux))
        captured.update(state.captured)
    return captured


def run_plan(engine: Engine, plan: Plan, batch: Batch, kwargs: dict, all_layers: bool = False, start: int = 0,
             keep: tuple[int, ...] = (), masks: dict | None = None, where: str = "this model"
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``plan`` on ``batch`` with ``engine``: each auxiliary run first (captures), then the plan's own schedule.
    Returns the pooled reads (:meth:`Walk.result`) and ``{j: hidden_states[j]}`` for ``keep``."""
    captured = run_captures(engine, plan, batch)
    walk_schedule = schedule(plan, all_layers, start, tuple(keep))
    state = Walk(plan, batch, captured, masks or {})
    engine(walk_schedule, state, kwargs)
    return state.result(walk_schedule, all_layers, where), state.kept


def flatten_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, L, heads, d_head]`` (TransformerLens's o_proj input) -> ``[B, L, heads * d_head]`` (head-major, as in
    HF); other shapes as they are.

    >>> flatten_heads(torch.zeros(2, 3, 4, 5)).shape, unflatten_heads(torch.zeros(2, 3, 20), torch.Size([2, 3, 4, 5])).shape
    (torch.Size([2, 3, 20]), torch.Size([2, 3, 4, 5]))
    """
    return rearrange(t, "b l h d -> b l (h d)") if t.dim() == 4 else t


def unflatten_heads(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`flatten_heads` for a tensor that had ``shape``."""
    return rearrange(t, "b l (h d) -> b l h d", h=shape[2]) if len(shape) == 4 else t
