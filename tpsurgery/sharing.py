"""Sweep rows that agree on their first layers run them once: plan the runs (data), then run them on one batch.

``common_layers`` says up to which layer two plans compute the same ``hidden_states``; ``share`` orders a list of plans
so that each starts from the earlier plan it agrees with longest, resuming at that layer from the hidden state that
plan keeps (``NNsightBackend.run_part``: earlier layers skipped with nnsight's ``Envoy.skip``); ``run_shared`` runs one
batch that way and ``LayerReads`` stores every read once (rows share the slots of the layers they share).
:func:`encode_schedules` reads every layer of several plans for a list of texts; :func:`tpsurgery.sweep.run_sweep`
uses it (docs/evaluation.md).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .backends import Backend, ResumableBackend
from .batching import Progress, check_budget
from .batch import Batch
from .plan import Plan
from .resources import caller_indices, check_texts, non_finite_message, non_finite_rows


def batch_key(plan: Plan) -> tuple:
    """Plans with equal keys run on the same batches: collation (with the auxiliary runs' batches) and prompt-prefix
    reuse depend on these facts of the plan (:class:`~tpsurgery.plan.Plan`: ``reach`` and ``min_length`` for the
    rows a batch rejects, ``touches`` and ``prefix_reusable`` for the prefix limit), and the inputs a batch rejects
    (mean pooling with no sentence token) on the pooling."""
    return (plan.reach, plan.min_length, plan.hide_placeholders, plan.prefix_reusable, plan.touches, plan.pooling,
            plan.pool_k, plan.runs)


def common_layers(a: Plan, b: Plan) -> int:
    """The decoder layer ``j`` up to which two plans compute the same thing: ``hidden_states[0..j]`` are equal.

    A run of ``b`` can start at layer ``j`` from ``a``'s ``hidden_states[j]`` (before ``b``'s own edit of layer ``j``).
    0 when they differ from the embedding output on (nothing worth sharing).

    >>> from tpsurgery.plan import compile_plan
    >>> from tpsurgery.recipe import parse_recipe
    >>> p = lambda stop: compile_plan(parse_recipe(f"prompt: '<PST> {{text}}'\\ntp: {{start: 1, stop: {stop}}}"), 6, 4)
    >>> common_layers(p(3), p(5)), common_layers(p(5), p(3)), common_layers(p(4), p(4))
    (3, 3, 6)
    """
    if batch_key(a) != batch_key(b) or (a.placeholder_id, a.n_heads) != (b.placeholder_id, b.n_heads):
        return 0
    ea, eb = a.by_layer(), b.by_layer()
    if ea.get(0, {}).get("embed") != eb.get(0, {}).get("embed"):
        return 0
    # edits compare as data (Vector values by value; the recipe field they came from does not count)
    n = min(a.layers_run, b.layers_run)
    return next((i for i in range(n) if _layer_edits(ea, i) != _layer_edits(eb, i)), n)


def _layer_edits(by_layer: dict, i: int) -> dict:
    """The edits of decoder layer ``i`` by site (the embedding output's are compared separately)."""
    return {site: edits for site, edits in by_layer.get(i, {}).items() if site != "embed"}


@dataclass(frozen=True)
class Sharing:
    """How a list of plans shares computation on one batch: plan ``r`` starts at layer ``start[r]`` from the hidden
    state that plan ``origin[r]`` keeps (``keep[origin[r]]`` holds that layer), and ``hidden_states[M]`` of plan ``r``
    is slot ``slots[r][M]`` of the result (slots of layers a plan shares are its origin's).

    >>> from tpsurgery.plan import compile_plan
    >>> from tpsurgery.recipe import parse_recipe
    >>> p = lambda stop: compile_plan(parse_recipe(f"prompt: '<PST> {{text}}'\\ntp: {{start: 1, stop: {stop}}}"), 4, 4)
    >>> s = share([p(2), p(3), p(4)])
    >>> s.start, s.origin, s.keep, s.n_slots       # TP [1,3) runs layers 2..3 only, TP [1,4) layer 3 only
    ((0, 2, 3), (None, 0, 1), ((2,), (3,), ()), 8)
    >>> s.slots[2]                                 # hidden_states[0..3] of TP [1,4) are those of its origins
    (0, 1, 2, 5, 7)
    """

    start: tuple[int, ...]
    origin: tuple[int | None, ...]
    keep: tuple[tuple[int, ...], ...]
    slots: tuple[tuple[int, ...], ...]
    n_slots: int

    def own(self, r: int) -> range:
        """The ``hidden_states`` indices plan ``r`` computes itself (the rest are shared)."""
        first = self.start[r] + 1 if self.origin[r] is not None else 0
        return range(first, len(self.slots[r]))


def share(plans: Sequence[Plan], resume: bool = True) -> Sharing:
    """Plan the runs of ``plans`` on one batch so that common first layers run once (``resume=False``: no sharing).

    Plans run in the given order; each starts from the earlier plan it shares most layers with, resuming from the
    hidden state that plan keeps. A plan whose every read is shared does not run at all (empty :meth:`Sharing.own`).
    """
    start, origin, keep = [0] * len(plans), [None] * len(plans), [set() for _ in plans]
    for r in range(1, len(plans) if resume else 0):
        j, q = max((common_layers(plans[q], plans[r]), q) for q in range(r))
        while j > 0 and origin[q] is not None and start[q] >= j:  # q itself starts at or after j: ask its origin
            q = origin[q]
        if j > 0:
            start[r], origin[r] = j, q
            if j < plans[r].exit_layer:
                keep[q].add(j)
    slots: list[tuple[int, ...]] = []
    n = 0
    for r, plan in enumerate(plans):
        own = range(start[r] + 1 if origin[r] is not None else 0, plan.exit_layer + 1)
        row = [slots[origin[r]][m] if m not in own else -1 for m in range(plan.exit_layer + 1)]
        for m in own:
            row[m], n = n, n + 1
        slots.append(tuple(row))
    return Sharing(tuple(start), tuple(origin), tuple(tuple(sorted(k)) for k in keep), tuple(slots), n)


def share_groups(plans: Sequence[Plan], resume: bool = True) -> list[tuple[list[int], Sharing]]:
    """:func:`share` within each set of plans that run on the same batches (:func:`batch_key`), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for r, plan in enumerate(plans):
        groups.setdefault(batch_key(plan), []).append(r)
    return [(members, share([plans[r] for r in members], resume)) for members in groups.values()]


def layer_runs(plans: Sequence[Plan], resume: bool = True) -> int:
    """Decoder-layer forwards per batch for all ``plans`` (``resume=False``: each plan on its own).

    >>> from tpsurgery.plan import compile_plan
    >>> from tpsurgery.recipe import parse_recipe
    >>> plans = [compile_plan(parse_recipe(f"prompt: '<PST> {{text}}'\\ntp: {{start: 1, stop: {k}}}"), 30, 4)
    ...          for k in range(2, 31)]
    >>> layer_runs(plans), layer_runs(plans, resume=False)
    (436, 870)
    """
    total = 0
    for members, sharing in share_groups(plans, resume):
        for r, plan in zip(range(len(members)), (plans[k] for k in members)):
            total += plan.layers_run - sharing.start[r] if len(sharing.own(r)) else 0
    return total


def run_shared(backend: Backend, plans: Sequence[Plan], sharing: Sharing, d: int, batch: Batch,
               kw: dict) -> torch.Tensor:
    """One batch through every plan of a :class:`Sharing` on ``backend``: ``[B, n_slots, d]`` float32 (CPU).
    A sharing that resumes or keeps a layer needs a :class:`ResumableBackend`."""
    out = torch.empty((batch.size, sharing.n_slots, d), dtype=torch.float32)
    last_use = {(q, sharing.start[r]): r for r, q in enumerate(sharing.origin) if q is not None and len(sharing.own(r))}
    kept: dict[tuple[int, int], torch.Tensor] = {}
    for r, plan in enumerate(plans):
        own = sharing.own(r)
        if not len(own):
            continue  # every read of this plan is shared with earlier ones
        q, j = sharing.origin[r], sharing.start[r]
        if q is None and not sharing.keep[r]:
            reads = backend.run(plan, batch, all_layers=True, **kw)
        else:
            reads, new = backend.run_part(plan, batch, start=j if q is not None else 0,
                                               hidden=kept.get((q, j)), keep=sharing.keep[r], **kw)
            kept.update({(r, layer): h for layer, h in new.items()})
        out[:, [sharing.slots[r][m] for m in own]] = reads.float().cpu()
        for key in [k for k, last in last_use.items() if last == r]:
            kept.pop(key, None)  # no later plan resumes from it
    return out


@dataclass(frozen=True)
class LayerReads:
    """Pooled ``hidden_states`` of several plans (:func:`encode_schedules`): ``reads[r, M]`` is ``[n, d]``;
    plans that share a layer share its slot in ``values`` (``[n, slots, d]``), so equal reads are stored once.
    ``truncated`` / ``non_finite``: indices of the inputs that were cut to the model's limit / came out NaN or inf."""

    values: torch.Tensor
    slots: tuple[tuple[int, ...], ...]
    truncated: tuple[int, ...] = ()
    non_finite: tuple[int, ...] = ()

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        r, m = key
        return self.values[:, self.slots[r][m]]


def encode_schedules(embedder: Any, sentences: Sequence[str], plans: Sequence[Plan], batch_size: int = 32,
                     share_layers: bool = True, show_progress_bar: Any = None, warn: bool = True,
                     max_tokens: int | None = None) -> LayerReads:
    """Every ``hidden_states[M]`` (M = 0..exit) of several plans, first layers they agree on computed once.

    For sweeps: TP [1, k) for k = 2..L agree on layers < k-1, so each row runs only the layers after its
    predecessor's last shared one (``share_layers=False`` or a backend that is no :class:`ResumableBackend`: each
    plan on its own). ``embedder``: a :class:`tpsurgery.Embedder` (its templates, batching and prompt-prefix reuse).
    Returns a :class:`LayerReads`: ``result[r, M]`` is ``[n, d]``, equal to
    ``embedder.encode(..., all_layers=True, plan=plans[r])[:, M]``. Peak memory: about twice the result.
    ``warn=False``: truncated / non-finite inputs are only listed in the result, not warned about.

    >>> import tpsurgery
    >>> from tpsurgery.plan import compile_plan
    >>> from tpsurgery.testing import tiny_model
    >>> model, tok = tiny_model("llama", n_layers=3)
    >>> emb = tpsurgery.apply(model, "prompt: '<PST> {text} means'", tokenizer=tok)
    >>> plans = [compile_plan(emb.recipe.replace(tp={"start": 1, "stop": k}), 3, 32) for k in (2, 3)]
    >>> reads = encode_schedules(emb, ["a b", "c"], plans)
    >>> reads[1, 3].shape, reads.slots    # hidden_states[0..2] of TP [1,3) are TP [1,2)'s
    (torch.Size([2, 32]), ((0, 1, 2, 3), (0, 1, 2, 4)))
    """
    texts = check_texts(sentences)
    check_budget(batch_size, max_tokens)
    unique = list(dict.fromkeys(texts))
    d = embedder.hidden_size
    groups = share_groups(plans, share_layers and isinstance(embedder.backend, ResumableBackend))
    slots, n = [()] * len(plans), 0
    for members, sharing in groups:
        for r, row in zip(members, sharing.slots):
            slots[r] = tuple(n + k for k in row)
        n += sharing.n_slots
    values = torch.zeros(len(unique), n, d)  # template results are added in place: no per-template copies
    progress = Progress(show_progress_bar, len(unique), 1 / (len(groups) * len(embedder.recipe.templates)))

    def add_template(template: str, cut: set) -> None:
        off = 0
        for members, sharing in groups:
            run = functools.partial(run_shared, embedder.backend, [plans[r] for r in members], sharing, d)
            values[:, off: off + sharing.n_slots] += embedder.encode_rows(
                unique, template, batch_size, progress, plans[members[0]], (sharing.n_slots, d), run, cut, max_tokens)
            off += sharing.n_slots

    try:
        with embedder.timing(texts):
            truncated = embedder.per_template(unique, texts, add_template, warn)[1] if unique else []
    finally:
        progress.close()
    values /= len(embedder.recipe.templates)
    bad = caller_indices(non_finite_rows(values), unique, texts)
    if bad and warn:
        warnings.warn(non_finite_message(bad), UserWarning, stacklevel=2)
    if texts != unique:
        where = {t: i for i, t in enumerate(unique)}
        values = values[torch.tensor([where[t] for t in texts], dtype=torch.long)]
    return LayerReads(values, tuple(slots), tuple(truncated), tuple(bad))
