"""Plans: a recipe compiled against a model's depth (layer schedule) and a tokenized batch (tensors).

Both are plain data read by fixed backend code.

>>> from tpsurgery.recipe import parse_recipe
>>> plan = compile_plan(parse_recipe("prompt: '<PST> {text}'\\ntp: {start: 1, stop: 3}\\nexit_layer: -2"), n_layers=4, hidden_size=8)
>>> plan.exit_layer, plan.tp_layers, plan.layers_run
(3, (1, 2), 3)
>>> print(plan.describe())
layer 0: plain
layer 1: TP (placeholder <- source)
layer 2: TP (placeholder <- source)
read hidden_states[3] (output of decoder layer 2); layers 3.. and the LM head never run
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import InputError, RecipeError
from .prompts import Encoded
from .recipe import Recipe


@dataclass(frozen=True)
class Plan:
    """What the backend does, per layer, for one recipe on one model.

    ``exit_layer`` is the resolved HF ``hidden_states`` index M in ``[0, n_layers]``; ``tp_layers`` the sorted
    0-based decoder layers (all < M) before which placeholders are overwritten; ``init_vector`` the placeholder's
    initial embedding-output row (None: the carrier token's own embedding); ``mask_layers`` the layers in which no
    other token attends to a placeholder; ``hide_placeholders``: placeholders get attention mask 0 (invisible in every
    layer, no position id); ``bidirectional_layers`` the layers with the ``bidirectional`` mask edit.
    """

    n_layers: int
    exit_layer: int
    tp_layers: tuple[int, ...]
    alpha: float
    source: int
    placeholder_id: int
    init_vector: torch.Tensor | None
    mask_layers: tuple[int, ...]
    bidirectional: str
    bidirectional_layers: tuple[int, ...]
    pooling: str
    hide_placeholders: bool = False

    @property
    def layers_run(self) -> int:
        """How many decoder layers run (the rest, the final norm unless M == n_layers, and the LM head never do)."""
        return min(self.exit_layer, self.n_layers)

    @property
    def needs_masks(self) -> bool:
        return bool(self.mask_layers or self.bidirectional_layers)

    def describe(self) -> str:
        lines = []
        for i in range(self.layers_run):
            acts = []
            if i in self.tp_layers:
                acts.append("TP (placeholder <- source)" if self.alpha == 1.0 else f"TP (alpha={self.alpha})")
            if i in self.mask_layers:
                acts.append("placeholder masked")
            if i in self.bidirectional_layers:
                acts.append(f"bidirectional={self.bidirectional}")
            lines.append(f"layer {i}: {', '.join(acts) or 'plain'}")
        m = self.exit_layer
        where = ("embedding output" if m == 0 else "final-norm output" if m == self.n_layers
                 else f"output of decoder layer {m - 1}")
        tail = "the LM head never runs" if m == self.n_layers else f"layers {m}.. and the LM head never run"
        lines.append(f"read hidden_states[{m}] ({where}); {tail}")
        return "\n".join(lines)


def resolve_exit_layer(exit_layer: int, n_layers: int) -> int:
    """HF ``hidden_states`` index: ``-1`` -> ``n_layers`` (final norm), ``-k`` -> ``n_layers + 1 - k``."""
    m = exit_layer + n_layers + 1 if exit_layer < 0 else exit_layer
    if not 0 <= m <= n_layers:
        raise RecipeError(
            "exit_layer",
            f"{exit_layer} is out of range for a model with {n_layers} decoder layers "
            f"(allowed: 0..{n_layers} or -{n_layers + 1}..-1; 0 = embedding output, {n_layers} = final-norm output)",
        )
    return m


def _span_layers(span, n_layers: int, field: str) -> range:
    if span.stop > n_layers:
        raise RecipeError(field, f"span [{span.start}, {span.stop}) exceeds the model's {n_layers} decoder layers")
    return range(span.start, span.stop)


def initial_vector(recipe: Recipe, hidden_size: int) -> torch.Tensor | None:
    """The placeholder's initial embedding-output row, or None for ``init: token``."""
    p = recipe.placeholder
    if p.init == "token":
        return None
    if p.init == "zeros":
        return torch.zeros(hidden_size)
    if p.init == "ones":
        return torch.ones(hidden_size)
    g = torch.Generator().manual_seed(p.seed)
    if p.init == "uniform":
        return torch.rand(hidden_size, generator=g)
    return torch.randn(hidden_size, generator=g) * p.std + p.mean


def _warn_dropped(tp, m: int) -> None:
    """One warning when the exit layer cuts off explicitly scheduled TP layers (``resume`` runs up to M by design)."""
    cut = [f"tp.spans.{k} [{s.start}, {s.stop})" for k, s in enumerate(tp.spans) if s.stop > m]
    if cut:
        read = "the embedding output" if m == 0 else f"the output of decoder layer {m - 1}"
        warnings.warn(f"{', '.join(cut)}: TP before decoder layers >= {m} is dropped, because exit_layer reads "
                      f"hidden_states[{m}] ({read}), which later layers cannot change", UserWarning, stacklevel=3)


def compile_plan(recipe: Recipe, n_layers: int, hidden_size: int, placeholder_id: int | None = None,
                 exit_layer: int | None = None) -> Plan:
    """Check a recipe against a model's depth and fix the per-layer schedule. ``exit_layer`` overrides the recipe's."""
    m = exit_layer if exit_layer is not None else recipe.exit_layer
    if m == "auto":
        raise RecipeError("exit_layer", "'auto' must be resolved from a sweep first (tpsurgery sweep)")
    m = resolve_exit_layer(m, n_layers)
    tp = recipe.tp
    layers: list[int] = []
    for k, span in enumerate(tp.spans):
        layers.extend(_span_layers(span, n_layers, f"tp.spans.{k}"))
    if tp.resume is not None:
        if tp.resume >= n_layers:
            raise RecipeError("tp.resume", f"{tp.resume} is not a layer of this model ({n_layers} decoder layers)")
        layers.extend(range(tp.resume, n_layers))
    # TP before layer i only changes hidden_states[j] for j > i: layers >= M never influence the read.
    tp_layers = tuple(sorted(i for i in set(layers) if i < m))
    _warn_dropped(tp, m)
    mask_layers = (0,) if recipe.placeholder.mask == "first_layer" and m > 0 else ()
    att = recipe.attention
    bidir: tuple[int, ...] = ()
    if att.bidirectional != "none":
        rng = _span_layers(att.layers, n_layers, "attention.layers") if att.layers else range(n_layers)
        bidir = tuple(i for i in rng if i < m)
    return Plan(
        n_layers=n_layers,
        exit_layer=m,
        tp_layers=tp_layers,
        alpha=tp.alpha,
        source=tp.source,
        placeholder_id=recipe.placeholder.token_id if placeholder_id is None else placeholder_id,
        init_vector=initial_vector(recipe, hidden_size),
        mask_layers=mask_layers,
        bidirectional=att.bidirectional,
        bidirectional_layers=bidir,
        pooling=recipe.pooling,
        hide_placeholders=recipe.placeholder.mask == "all",
    )


@dataclass(frozen=True)
class Batch:
    """A left-padded batch: model inputs plus where placeholders sit, which row is the source, what is pooled.

    ``placeholders`` and ``source`` are absolute column indices; ``text_mask`` marks the last ``{text}`` slot's tokens
    (mean pooling); ``text_start`` is each row's first sentence column (end of the bidirectional span is ``text_end``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    placeholders: torch.Tensor
    source: torch.Tensor
    text_mask: torch.Tensor
    text_end: torch.Tensor

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(rows: Sequence[Encoded], pad_id: int, source: int = -1, indices: Sequence[int] | None = None,
            hide_placeholders: bool = False) -> Batch:
    """Left-pad encoded rows into a :class:`Batch`; position ids count visible tokens only (``cumsum(mask) - 1``).

    ``hide_placeholders`` gives placeholder columns attention mask 0 (nothing attends to them, no position id).
    """
    indices = list(indices) if indices is not None else list(range(len(rows)))
    width = max(len(r.ids) for r in rows)
    n_ph = {len(r.placeholders) for r in rows}
    if len(n_ph) != 1:
        raise InputError(None, "rows of one batch must share their template (different placeholder counts)")
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    text = torch.zeros((len(rows), width), dtype=torch.float32)
    ph = torch.zeros((len(rows), n_ph.pop()), dtype=torch.long)
    text_end = torch.zeros(len(rows), dtype=torch.long)
    for b, (r, idx) in enumerate(zip(rows, indices)):
        if len(r.ids) == 0:
            raise InputError(idx, "the prompted input has no tokens (empty text and no prompt)")
        if len(r.ids) < -source:
            raise InputError(idx, f"tp.source={source} reaches before the start of this {len(r.ids)}-token input")
        off = width - len(r.ids)
        ids[b, off:] = torch.tensor(r.ids)
        mask[b, off:] = 1
        text[b, off + r.text_span[0]: off + r.text_span[1]] = 1.0
        text_end[b] = off + r.text_span[1]
        if r.placeholders:
            ph[b] = torch.tensor(r.placeholders) + off
            if hide_placeholders:
                mask[b, ph[b]] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    src = torch.full((len(rows),), width + source, dtype=torch.long)
    return Batch(ids, mask, pos, ph, src, text, text_end)


def _layer_edits(plan: Plan, i: int) -> tuple:
    return (plan.alpha if i in plan.tp_layers else None, i in plan.mask_layers,
            plan.bidirectional if i in plan.bidirectional_layers else None)


def batch_key(plan: Plan) -> tuple:
    """Plans with equal keys run on the same batches (collation and prompt-prefix reuse depend on these only)."""
    return plan.source, plan.hide_placeholders, plan.needs_masks


def common_layers(a: Plan, b: Plan) -> int:
    """The decoder layer ``j`` up to which two plans compute the same thing: ``hidden_states[0..j]`` are equal.

    A run of ``b`` can start at layer ``j`` from ``a``'s ``hidden_states[j]`` (before ``b``'s own edit of layer ``j``).
    0 when they differ from the embedding output on (nothing worth sharing).

    >>> from tpsurgery.recipe import parse_recipe
    >>> p = lambda stop: compile_plan(parse_recipe(f"prompt: '<PST> {{text}}'\\ntp: {{start: 1, stop: {stop}}}"), 6, 4)
    >>> common_layers(p(3), p(5)), common_layers(p(5), p(3)), common_layers(p(4), p(4))
    (3, 3, 6)
    """
    if batch_key(a) != batch_key(b) or (a.placeholder_id, a.pooling) != (b.placeholder_id, b.pooling):
        return 0
    if (a.init_vector is None) != (b.init_vector is None) or (
            a.init_vector is not None and not torch.equal(a.init_vector, b.init_vector)):
        return 0
    n = min(a.layers_run, b.layers_run)
    return next((i for i in range(n) if _layer_edits(a, i) != _layer_edits(b, i)), n)


@dataclass(frozen=True)
class Sharing:
    """How a list of plans shares computation on one batch: plan ``r`` starts at layer ``start[r]`` from the hidden
    state that plan ``origin[r]`` keeps (``keep[origin[r]]`` holds that layer), and ``hidden_states[M]`` of plan ``r``
    is slot ``slots[r][M]`` of the result (slots of layers a plan shares are its origin's).

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
