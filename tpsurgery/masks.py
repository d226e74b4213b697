"""Per-layer attention masks: the placeholder mask of layer 0 and the bidirectional baselines.

Masks are built with transformers' ``masking_utils`` so that every layer gets its own mask in the format its attention
implementation expects (sdpa: 4D bool; eager: 4D additive float; Gemma2/3 sliding-window layers: the sliding mask).
The recipe's edits are mask functions ``f(batch, head, q, kv) -> bool`` OR'ed onto (bidirectional) or AND'ed with
(placeholder masking) the layer's own causal or sliding mask; padding is AND'ed last, so pads stay masked.

>>> import torch
>>> from tpsurgery.masks import allowed
>>> from tpsurgery.batch import Batch
>>> b = Batch(input_ids=torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]),
...           position_ids=torch.tensor([[0, 0, 1, 2, 3]]), placeholders=torch.tensor([[2]]),
...           source=torch.tensor([4]), text_mask=torch.tensor([[0., 0., 0., 1., 0.]]), text_end=torch.tensor([4]))
>>> allowed(b, bidirectional="last_token", sliding_window=None)[0].int().tolist()  # rows: queries, columns: keys
[[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
>>> allowed(b, mask_placeholders=True, sliding_window=None)[0].int().tolist()
[[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 1]]
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Int

from .errors import ModelError, RecipeError
from .placement import input_device
from .versions import cache_kwarg
from .batch import Batch
from .plan import Plan

MaskFn = Callable[[Any, Any, Any, Any], Any]
SUPPORTED_ATTENTION = ("sdpa", "eager")


def _spans(batch: Batch) -> tuple[Bool[torch.Tensor, "b l"], Int[torch.Tensor, " b"], Int[torch.Tensor, " b"]]:
    """Per row: is-placeholder columns [B, L], first placeholder column [B], end of the sentence [B] (exclusive)."""
    b, length = batch.input_ids.shape
    is_ph = torch.zeros((b, length), dtype=torch.bool)
    if batch.placeholders.shape[1]:
        is_ph[torch.arange(b).unsqueeze(1), batch.placeholders] = True
        first = batch.placeholders.min(1).values
    else:  # no placeholder: the edits have nothing to start from (recipes with bidirectional need one)
        first = torch.full((b,), length, dtype=torch.long)
    return is_ph, first, batch.text_end.clone()


def _modes(bidirectional: str | Sequence[str]) -> tuple[str, ...]:
    modes = (bidirectional,) if isinstance(bidirectional, str) else tuple(bidirectional)
    for mode in modes:
        if mode not in ("none", "last_token", "sentence"):
            raise RecipeError("attention.bidirectional", f"unknown mode {mode!r}; allowed: none, last_token, sentence")
    return tuple(m for m in modes if m != "none")


def edit_functions(batch: Batch, *, mask_placeholders: bool = False, bidirectional: str | Sequence[str] = "none",
                   device: Any = "cpu") -> tuple[MaskFn | None, MaskFn | None]:
    """``(or_fn, and_fn)`` for ``masking_utils``: the bidirectional overlay and the placeholder mask (None: no edit).

    * ``mask_placeholders``: a query attends to a placeholder key only if it is that placeholder (no empty rows).
    * ``bidirectional="last_token"``: every query from the first placeholder onward also attends to the last column.
    * ``bidirectional="sentence"``: queries and keys in ``[first placeholder, end of sentence)`` see each other.

    Several modes (a sequence) are OR'ed.
    """
    is_ph, first, end = (t.to(device) for t in _spans(batch))
    last = batch.input_ids.shape[1] - 1
    overlays: list[MaskFn] = []
    for mode in _modes(bidirectional):
        if mode == "last_token":
            overlays.append(lambda b, h, q, kv: (q >= first[b]) & (kv == last))
        else:
            overlays.append(lambda b, h, q, kv: (q >= first[b]) & (q < end[b]) & (kv >= first[b]) & (kv < end[b]))
    or_fn = and_fn = None
    if len(overlays) == 1:
        or_fn = overlays[0]
    elif overlays:
        def or_fn(b, h, q, kv):
            out = overlays[0](b, h, q, kv)
            for f in overlays[1:]:
                out = out | f(b, h, q, kv)
            return out
    if mask_placeholders:
        def and_fn(b, h, q, kv):
            return ~is_ph[b, kv] | (q == kv)
    return or_fn, and_fn


def allowed(batch: Batch, *, mask_placeholders: bool = False, bidirectional: str | Sequence[str] = "none",
            sliding_window: int | None = None) -> Bool[torch.Tensor, "b l l"]:
    """The reference boolean mask ``[B, L, L]`` (True = query row may attend to key column), built without
    ``masking_utils``: what :func:`layer_masks` must encode. Used by the tests and the docs."""
    bsz, length = batch.input_ids.shape
    q = torch.arange(length).view(1, length, 1)
    kv = torch.arange(length).view(1, 1, length)
    base = kv <= q
    if sliding_window is not None:
        base = base & (q - kv < sliding_window)
    is_ph, first, end = _spans(batch)
    first, end = first.view(bsz, 1, 1), end.view(bsz, 1, 1)
    for mode in _modes(bidirectional):
        if mode == "last_token":
            base = base | ((q >= first) & (kv == length - 1))
        else:
            base = base | ((q >= first) & (q < end) & (kv >= first) & (kv < end))
    if mask_placeholders:
        base = base & (~is_ph.unsqueeze(1) | (q == kv))
    return base & batch.attention_mask.bool().unsqueeze(1)


def layer_kind(config: Any, layer: int) -> str:
    """``full_attention`` or ``sliding_attention`` (from ``config.layer_types``, else ``config.sliding_window``)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        kind = types[layer]
    else:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    if kind not in ("full_attention", "sliding_attention"):
        raise ModelError(f"layer {layer} has attention type {kind!r}; tpsurgery's mask edits support only full "
                         "and sliding-window attention")
    return kind


def check_model(model: Any) -> None:
    """Raise :class:`ModelError` if this model's attention cannot take an edited mask."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ModelError(f"attention masks (placeholder.mask_first_layer, attention.bidirectional) need sdpa or eager "
                         f"attention; this model uses {impl!r} (load it with attn_implementation='sdpa')")
    if getattr(cfg, "alibi", False):
        raise ModelError("attention-mask edits are not supported for ALiBi models (the bias lives in the mask)")
    if not getattr(cfg, "is_causal", True):
        raise ModelError("attention-mask edits need a causal decoder (config.is_causal is False)")


def layer_edits(plan: Plan, layer: int) -> tuple[bool, tuple[str, ...]]:
    """``(hide placeholders, bidirectional modes)`` of one decoder layer's mask, from that layer's own edits.

    >>> from tpsurgery.edits import Edit
    >>> from tpsurgery.plan import Plan
    >>> plan = Plan(4, 4, (Edit("attn_mask", 0, "bidirectional", mode="last_token"),
    ...                    Edit("attn_mask", 1, "bidirectional", mode="sentence")), "last", 0)
    >>> layer_edits(plan, 0), layer_edits(plan, 1), layer_edits(plan, 2)
    ((False, ('last_token',)), (False, ('sentence',)), (False, ()))
    """
    edits = plan.at("attn_mask", layer)
    modes = tuple(dict.fromkeys(e.mode for e in edits if e.op == "bidirectional"))
    return any(e.op == "hide" for e in edits), modes


def layer_masks(model: Any, plan: Plan, batch: Batch) -> dict[int, Any]:
    """``{layer: mask}`` for every decoder layer whose mask the plan edits, each in that layer's own format and made
    of that layer's own edits (:func:`layer_edits`).

    Layers not in the result keep the model's own mask (the plain path is untouched).
    """
    from transformers import masking_utils as mu

    layers = sorted({e.layer for e in plan.at("attn_mask")})
    if not layers:
        return {}
    check_model(model)
    dtype, device = next(model.parameters()).dtype, input_device(model)  # accelerate moves masks to later layers
    b, length = batch.input_ids.shape
    shape_only = torch.empty((b, length, 1), dtype=dtype, device=device)
    kw = {"config": model.config, "inputs_embeds": shape_only, "attention_mask": batch.attention_mask.to(device),
          cache_kwarg(): None, "position_ids": batch.position_ids.to(device)}
    out: dict[int, Any] = {}
    built: dict[tuple, Any] = {}
    for i in layers:
        key = (layer_kind(model.config, i), *layer_edits(plan, i))
        if key not in built:
            or_fn, and_fn = edit_functions(batch, mask_placeholders=key[1], bidirectional=key[2], device=device)
            make = mu.create_sliding_window_causal_mask if key[0] == "sliding_attention" else mu.create_causal_mask
            built[key] = make(**kw, or_mask_function=or_fn, and_mask_function=and_fn)
        out[i] = built[key]
    return out


def mask_position(layer: Any) -> int:
    """Index of ``attention_mask`` among a decoder layer's positional arguments (GPT-2 passes it positionally)."""
    # the class's function, not the instance attribute (nnsight wraps instances' forward)
    params = [p for p in inspect.signature(type(layer).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # drop self
    names = [p.name for p in params]
    if "attention_mask" not in names:
        raise ModelError(f"decoder layer {type(layer).__name__} has no attention_mask argument to replace")
    return names.index("attention_mask")


def replace_mask(inputs: tuple[tuple, dict], mask: Any, position: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a layer call with its attention mask replaced (wherever the caller passed it)."""
    args, kwargs = inputs
    if "attention_mask" in kwargs or len(args) <= position:
        return tuple(args), {**kwargs, "attention_mask": mask}
    return tuple(args[:position]) + (mask,) + tuple(args[position + 1:]), dict(kwargs)
