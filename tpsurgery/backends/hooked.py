"""The trace-free fast path: a plan's schedule run with plain PyTorch hooks on the modules it touches, nothing else.

``nnsight.NNsight(model)`` puts a forward wrapper on every module and routes each call through its interleaver; on a
small model, or on a GPU where the host issues the kernels, that bookkeeping costs more than the layers (about 1.5x on
a tiny 30-layer Llama, docs/performance.md). Every point of a schedule (:mod:`tpsurgery.backends.walk`) is of the kind
a hook can do, so :func:`hook_engine` maps each site to ``register_forward_pre_hook`` / ``register_forward_hook`` on
one module (the table in :func:`_register`) and the hook of the last point raises :class:`~tpsurgery.backends.walk.Stop`,
so later layers, the final norm (unless read) and the LM head never run; auxiliary prompt runs (Contrastive Prompting)
run the same way along their capture schedules. Hooks are always removed, also on errors.

>>> import torch, tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=3)
>>> emb = tpsurgery.apply(model, "prompt: 'This sentence : <PST> {text} means'\\ntp: {start: 1, stop: 2}\\nexit_layer: 2",
...                       tokenizer=tok)
>>> batch = next(emb.batches(emb.tokenize(["a b"], emb.recipe.templates[0]), 8))[1]
>>> kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
...           use_cache=False)
>>> out, kept = run_hooked(model, emb.spec, emb.plan, batch, False, kw)
>>> out.shape, [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == [0] * len(list(model.modules()))
(torch.Size([1, 32]), True)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from ..arch import ArchSpec, attn_out_module, embed_site, get_path
from ..errors import BackendError
from ..masks import replace_mask
from ..batch import Batch
from ..plan import Plan
from .walk import Engine, Point, Schedule, Stop, Walk, run_plan


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor on ``device``, each copied once: from pinned memory without blocking on CUDA (a
    copy from pageable memory waits for the queued kernels), so the edits' index tensors need no copy per layer.

    >>> from tpsurgery.batch import collate
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


@contextlib.contextmanager
def _removing(handles: list) -> Iterator[list]:
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _register(model: Any, spec: ArchSpec, point: Point, walk: Walk, last: bool, where: int) -> Any:
    """The hook of one schedule point on its module (the site-to-hook table of this engine); returns the handle."""
    layers = get_path(model, spec.layers)
    i, site = point.layer, point.site
    if site == "attn_mask":
        def swap(mod, args, kwargs):  # never the last point: a read of a later site follows
            return replace_mask((args, kwargs), walk.masks[i], where)

        return layers[i].register_forward_pre_hook(swap, with_kwargs=True)
    fn = walk.hook(point, last)
    if site == "embed" and embed_site(spec)[1] == "input":  # a scaled embedding: hidden_states[0] is layer 0's input
        def pre0(mod, args):
            h = fn(args[0])
            return None if h is args[0] else (h, *args[1:])

        return get_path(model, embed_site(spec)[0]).register_forward_pre_hook(pre0)
    if site in ("embed", "norm"):
        return get_path(model, spec.embed if site == "embed" else spec.norm).register_forward_hook(
            lambda mod, args, out: fn(out))
    if site in ("layer_in", "attn_out_in"):
        module = layers[i] if site == "layer_in" else attn_out_module(spec, layers[i], i, point.field)

        def pre(mod, args):
            h = fn(args[0])
            return None if h is args[0] else (h, *args[1:])

        return module.register_forward_pre_hook(pre)
    if site == "layer_out":
        def post(mod, args, out):
            h = out[0] if spec.tuple_output else out
            new = fn(h)
            if new is h:
                return None
            return (new, *out[1:]) if spec.tuple_output else new

        return layers[i].register_forward_hook(post)
    raise BackendError(f"the hook path cannot run schedule point {point} (layers are skipped by resumed runs only, "
                       "which the nnsight trace runs)", i)


def hook_engine(model: Any, spec: ArchSpec, where: int = 0) -> Engine:
    """The engine that runs a schedule with plain PyTorch hooks on ``model`` (``where``: the positional index of a
    decoder layer's ``attention_mask`` argument); the last point's hook raises :class:`Stop`."""
    def run(plan_schedule: Schedule, walk: Walk, kwargs: dict) -> None:
        points = plan_schedule.points
        with _removing([]) as handles:
            for k, point in enumerate(points):
                handles.append(_register(model, spec, point, walk, k == len(points) - 1, where))
            try:
                model(**kwargs)
            except Stop:
                pass

    return run


def run_hooked(model: Any, spec: ArchSpec, plan: Plan, batch: Batch, all_layers: bool, kwargs: dict,
               masks: dict | None = None, where: int = 0, keep: tuple[int, ...] = ()
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Pooled ``hidden_states[M]`` (``[B, d]``; ``[B, M + 1, d]`` with ``all_layers``) of the plan on one batch, and
    ``{j: hidden_states[j]}`` for ``keep`` (:func:`tpsurgery.backends.walk.run_plan` with :func:`hook_engine`).

    ``batch``: on the model's device (:func:`batch_to`); ``kwargs``: the model's forward arguments (device tensors,
    possibly a prefix cache); ``masks``: ``{layer: mask}`` edited attention masks, placed at positional index ``where``
    when the layer takes its mask positionally.
    """
    return run_plan(hook_engine(model, spec, where), plan, batch, kwargs, all_layers, keep=keep, masks=masks,
                    where=type(model).__name__)
