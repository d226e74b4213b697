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

