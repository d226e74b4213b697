"""The trace-free fast path: a plan run with plain PyTorch hooks on the modules it touches, and nothing else.

``nnsight.NNsight(model)`` puts a forward wrapper on every module and routes each call through its interleaver; on a
small model, or on a GPU where the host issues the kernels, that bookkeeping costs more than the layers (about 1.5x on
a tiny 30-layer Llama, docs/performance.md). A plan's edits are all of the kind a hook can do, so :func:`run_hooked`
runs them with ``register_forward_pre_hook`` / ``register_forward_hook`` on the touched modules only, with the same
edit functions (:mod:`tpsurgery.backends.surgery`, :func:`tpsurgery.masks.replace_mask`) and the same early exit: a
private exception raised by the hook that takes the last read, so later layers, the final norm (unless read) and the
LM head never run. Rows that edits take from auxiliary prompt runs (Contrastive Prompting) are captured the same way by
:func:`capture_hooked`, which stops each run after its last site. Hooks are always removed, also on errors.

>>> import torch, tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=3)
>>> emb = tpsurgery.apply(model, "prompt: 'This sentence : <PST> {text} means'\\ntp: {start: 1, stop: 2}\\nexit_layer: 2",
...                       tokenizer=tok)
>>> batch = next(emb.batches(emb.tokenize(["a b"], emb.recipe.templates[0]), 8))[1]
>>> kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
...           use_cache=False)
>>> out = run_hooked(model, emb.spec, emb.plan, batch, False, kw)
>>> out.shape, [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == [0] * len(list(model.modules()))
(torch.Size([1, 32]), True)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from ..arch import ArchSpec, attn_out_module, get_path
from ..masks import replace_mask
from ..plan import Batch, Plan
from .pooling import pool
from .surgery import apply_edits, capture


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor on ``device``, each copied once: from pinned memory without blocking on CUDA (a
    copy from pageable memory waits for the queued kernels), so the edits' index tensors need no copy per layer.

    >>> from tpsurgery.plan import collate
    >>> from tpsurgery.prompts import Encoded
    >>> b = collate([Encoded(ids=(5, 0, 6), placeholders=(1,), text_span=(2, 3))], pad_id=9)
    >>> batch_to(b, torch.device("cpu")).input_ids is b.input_ids
    True
    """
    cuda = device.type == "cuda"

    def move(t: Any) -> Any:
        if isinstance(t, Batch):
            return batch_to(t, device)
        if isinstance(t, tuple):  # Batch.others: (run name, Batch) pairs
            return tuple(move(x) for x in t)
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        return t.pin_memory().to(device, non_blocking=True) if cuda and t.device.type == "cpu" else t.to(device)

    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


class _Stop(Exception):
    """Raised by the hook that takes the last read: nothing after it runs."""


@contextlib.contextmanager
def _removing(handles: list) -> Iterator[list]:
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _site_hook(module_of: Any, spec: ArchSpec, site: str, i: int, fn: Any, field: str = "edits") -> Any:
    """Register ``fn(h)`` to see the hidden state at ``site`` of layer ``i``; returns the handle."""
    layers = get_path(module_of, spec.layers)
    if site == "embed":
        return get_path(module_of, spec.embed).register_forward_hook(lambda mod, args, out: fn(out))
    if site == "layer_in":
        return layers[i].register_forward_pre_hook(lambda mod, args: fn(args[0]))
    if site == "attn_out_in":
        return attn_out_module(spec, layers[i], i, field).register_forward_pre_hook(lambda mod, args: fn(args[0]))
    return layers[i].register_forward_hook(lambda mod, args, out: fn(out[0] if spec.tuple_output else out))


def capture_hooked(model: Any, spec: ArchSpec, plan: Plan, batch: Batch, device: torch.device) -> dict:
    """``{(run, site, layer, rows): [B, k, width]}``: the rows ``add`` / ``subtract`` edits take from each auxiliary
    run (``batch.other(run)``), each run stopped after the last site it provides."""
    out: dict = {}
    for run, _ in plan.runs:
        aux = batch_to(batch.other(run), device)
        wanted = plan.captures(run)
        with _removing([]) as handles:
            for k, (site, i, rows) in enumerate(wanted):
                def keep(h, key=(run, site, i, rows), last=k == len(wanted) - 1):
                    out[key] = capture(h, key[3], aux)
                    if last:
                        raise _Stop

                handles.append(_site_hook(model, spec, site, i, keep))
            try:
                model(input_ids=aux.input_ids, attention_mask=aux.attention_mask, position_ids=aux.position_ids,
                      use_cache=False)
            except _Stop:
                pass
    return out


def run_hooked(model: Any, spec: ArchSpec, plan: Plan, batch: Batch, all_layers: bool, kwargs: dict,
               masks: dict | None = None, where: int = 0, captured: dict | None = None) -> torch.Tensor:
    """Pooled ``hidden_states[M]`` (``[B, d]``; ``[B, M + 1, d]`` with ``all_layers``) of the plan on one batch.

    ``batch``: on the model's device (:func:`batch_to`); ``kwargs``: the model's forward arguments (device tensors,
    possibly a prefix cache); ``masks``: ``{layer: mask}``
    edited attention masks, placed at positional index ``where`` when the layer takes its mask positionally.
    """
    masks, captured = masks or {}, captured or {}
    layers = get_path(model, spec.layers)
    m, n = plan.exit_layer, plan.n_layers
    by_layer = plan.by_layer()  # {layer: {site: edits}}
    tuple_out = spec.tuple_output
    reads: list[torch.Tensor] = []

    def read(h: torch.Tensor, last: bool) -> None:
        reads.append(pool(h, plan, batch))
        if last:
            raise _Stop

    def edit(h: torch.Tensor, edits: Any, heads: int | None = None) -> torch.Tensor:
        return apply_edits(h, edits, batch, captured, heads)

    with _removing([]) as handles:
        embed_edits = by_layer.get(0, {}).get("embed")
        if embed_edits:
            handles.append(get_path(model, spec.embed).register_forward_hook(
                lambda mod, args, out: edit(out, embed_edits)))
        for i in range(plan.layers_run):
            edits = by_layer.get(i, {})
            layer_in, read_input = edits.get("layer_in"), all_layers and i == 0
            if i in masks or layer_in or read_input:
                def pre(mod, args, kw, i=i, layer_in=layer_in, read_input=read_input):
                    if i in masks:
                        args, kw = replace_mask((args, kw), masks[i], where)
                    if read_input:
                        read(args[0], False)
                    if layer_in:
                        args = (edit(args[0], layer_in), *args[1:])
                    return tuple(args), kw

                handles.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
            if edits.get("attn_out_in"):
                proj = attn_out_module(spec, layers[i], i, edits["attn_out_in"][0].field)
                handles.append(proj.register_forward_pre_hook(
                    lambda mod, args, e=edits["attn_out_in"]: (edit(args[0], e, plan.n_heads), *args[1:])))
            read_out = all_layers and i < m - 1 or (i == m - 1 and m < n)  # hidden_states[i + 1]
            if edits.get("layer_out") or read_out:
                def post(mod, args, out, e=edits.get("layer_out"), read_out=read_out, last=(i == m - 1)):
                    h = out[0] if tuple_out else out
                    if e:
                        h = edit(h, e)
                        out = (h, *out[1:]) if tuple_out else h
                    if read_out:
                        read(h, last)
                    return out

                handles.append(layers[i].register_forward_hook(post))
        if m == 0:  # no layer runs: the read is layer 0's input
            handles.append(layers[0].register_forward_pre_hook(lambda mod, args: read(args[0], True)))
        elif m == n:
            handles.append(get_path(model, spec.norm).register_forward_hook(lambda mod, args, out: read(out, True)))
        try:
            model(**kwargs)
        except _Stop:
            pass
    # a device_map'ed model reads each layer on its own device
    return torch.stack([r.to(reads[0].device) for r in reads], 1) if all_layers else reads[-1]
