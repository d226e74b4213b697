"""Prompt-prefix reuse: the keys/values of the prompt text before the first placeholder, computed once per template.

Every sentence of a template starts with the same tokens (the prompt up to the first ``<PST>``, or up to the sentence
when there is none). By causality those tokens' keys and values do not depend on what follows, and no edit or read touches
them (:meth:`tpsurgery.plan.Plan.prefix_limit` says how far that holds for a plan: an edit on every row, for
instance, leaves no prefix to reuse), so they are computed once (batch 1) and every batch runs only the rest of the sequence on
top of them. The rest is left-padded on its own, so pads sit *between* prefix and sentence: exact for full attention
(pads are masked and position ids count visible tokens), but sliding-window layers (Gemma2/3) measure the window in key
columns, pads included. There, :meth:`Prefix.needs_buckets` asks the embedder to batch only rows of equal length (no
pads at all) whenever prefix + rest can be longer than the window.

>>> from tpsurgery.prompts import Encoded
>>> rows = [Encoded((7, 8, 9, 0, 5, 6), (3,), (4, 5)), Encoded((7, 8, 9, 0, 4), (3,), (4, 5))]
>>> from tpsurgery.plan import compile_plan
>>> from tpsurgery.recipe import parse_recipe
>>> shared_prefix_length(rows, compile_plan(parse_recipe("prompt: 'a b c <PST> {text}'"), 2, 4))
3
>>> shared_prefix_length(rows, compile_plan(parse_recipe(
...     "prompt: 'a b c <PST> {text}'\\nedits: [{site: layer_in, layers: 0, rows: -4, op: scale, factor: 2}]"), 2, 4))
1
>>> [r.ids for r in split_rows(rows, 3)], [r.placeholders for r in split_rows(rows, 3)]
([(0, 5, 6), (0, 4)], [(0,), (0,)])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import BackendError
from .placement import input_device
from .versions import cache_kwarg
from .batch import Batch
from .plan import Plan
from .prompts import Encoded


def shared_prefix_length(rows: Sequence[Encoded], plan: Plan) -> int:
    """Leading tokens every row shares, within each row's :meth:`Plan.prefix_limit <tpsurgery.plan.Plan.prefix_limit>`
    (before the first placeholder and sentence token, and before any position an edit or the read touches)."""
    if not rows:
        return 0
    limit = min(plan.prefix_limit(r) for r in rows)
    first = rows[0].ids
    n = 0
    while n < limit and all(r.ids[n] == first[n] for r in rows):
        n += 1
    return n


def split_rows(rows: Sequence[Encoded], length: int) -> list[Encoded]:
    """The rows without their first ``length`` tokens (placeholder and sentence indices shifted)."""
    return [Encoded(r.ids[length:], tuple(p - length for p in r.placeholders),
                    (r.text_span[0] - length, r.text_span[1] - length), r.truncated, r.others) for r in rows]


def _is_sliding(model: Any, cache: Any) -> bool:
    cfg = model.config
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        return True
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return True
    return bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False


def _window(model: Any, cache: Any) -> int | None:
    """The smallest sliding window (None: unknown)."""
    sizes = [layer.sliding_window for layer in getattr(cache, "layers", ()) if getattr(layer, "is_sliding", False)]
    w = getattr(model.config, "sliding_window", None)
    sizes += [w] if isinstance(w, int) and w > 0 else []
    return min(sizes) if sizes else None


@dataclass(frozen=True)
class Prefix:
    """A template's shared prompt prefix and its keys/values (batch 1, never mutated)."""

    ids: tuple[int, ...]
    cache: Any
    exact_length: bool
    window: int | None = None

    def needs_buckets(self, width: int) -> bool:
        """Whether rows of up to ``width`` tokens after the prefix must be batched by exact length.

        Only for sliding-window layers, and only when prefix + rest can exceed the window (inside it, the window
        covers every key whatever the pads, so padded batches are exact).
        """
        return self.exact_length and (self.window is None or self.length + width > self.window)

    @property
    def length(self) -> int:
        return len(self.ids)

    def cache_for(self, batch_size: int) -> Any:
        """A fresh cache holding the prefix for ``batch_size`` rows (the forward appends to it; the stored one stays)."""
        from transformers.cache_utils import DynamicLayer

        c = copy.copy(self.cache)
        c.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in c.layers:
            if isinstance(layer, DynamicLayer) and getattr(layer, "is_initialized", False):
                # ``update`` concatenates into new tensors, so broadcast views are never written to
                layer.keys = layer.keys.expand(batch_size, -1, -1, -1)
                layer.values = layer.values.expand(batch_size, -1, -1, -1)
            else:
                layer.batch_repeat_interleave(batch_size)
        return c

    def model_inputs(self, batch: Batch, device: Any) -> dict[str, Any]:
        """Forward kwargs for the rest of the sequence: the mask covers prefix + rest, positions continue the prefix."""
        b = batch.size
        ones = torch.ones((b, self.length), dtype=batch.attention_mask.dtype)
        return dict(
            input_ids=batch.input_ids.to(device),
            attention_mask=torch.cat([ones, batch.attention_mask], 1).to(device),
            position_ids=(batch.position_ids + self.length).to(device),
            use_cache=True,
            **{cache_kwarg(): self.cache_for(b)},  # `cache` from transformers 5.2x, `past_key_values` before
        )


def compute_prefix(model: Any, ids: Sequence[int]) -> Prefix | None:
    """Run the prefix once and keep its keys/values; None if this model's forward does not return a usable cache."""
    from transformers.cache_utils import Cache, DynamicLayer

    device = input_device(model)
    t = torch.tensor([list(ids)], device=device)
    base = getattr(model, "base_model", model)  # the decoder without the LM head: only the keys/values are needed
    try:
        with torch.no_grad():
            out = base(input_ids=t, attention_mask=torch.ones_like(t), position_ids=torch.arange(len(ids), device=device)[None],
                        use_cache=True)
    except (TypeError, ValueError):
        return None
    except Exception as exc:  # like the backends: one error family, the original kept as the cause
        raise BackendError(f"computing the prompt prefix ({len(ids)} tokens) failed: {type(exc).__name__}: {exc}") \
            from exc
    cache = out.get(cache_kwarg(), None) if hasattr(out, "get") else None
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if not isinstance(cache, Cache) or not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
        return None
    return Prefix(tuple(ids), cache, _is_sliding(model, cache), _window(model, cache))


class PrefixStore:
    """Prefix keys/values per (weights version, prefix ids), a few templates deep (MetaEOL has eight)."""

    def __init__(self, model: Any, size: int = 16):
        self.model = model
        self.size = size
        self._store: dict[tuple, Prefix | None] = {}
        self.computed = 0

    def get(self, ids: Sequence[int]) -> Prefix | None:
        from .cache import weights_token

        key = (weights_token(self.model), tuple(ids))
        if key not in self._store:
            if len(self._store) >= self.size:
                self._store.pop(next(iter(self._store)))
            self._store[key] = compute_prefix(self.model, ids)
            self.computed += 1
        return self._store[key]

