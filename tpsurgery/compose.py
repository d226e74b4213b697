"""Inside your own trace: a recipe's interventions in an nnsight trace you write, or as TransformerLens hooks.

``with emb.trace(texts) as run:`` opens an nnsight trace of the model on the recipe's batch (the texts in the
recipe's prompt, placeholders spliced in, left-padded) with the recipe's edits already in it; your body reads, saves
and edits envoy values beside them, and after the block ``run.embeddings`` is what ``emb.encode(texts)`` returns (up
to float rounding: ``encode`` batches by length). The edits are the engine's own: the plan's schedule
(:mod:`tpsurgery.backends.walk`) visited by the nnsight backend's site table
(:func:`~tpsurgery.backends.nnsight_backend.trace_visitor`), run as an nnsight edit (a mediator ahead of your body)
on a copy of the model's envoy, so they happen before your interventions at the same point, and the model runs to
its end (no early exit: save any layer).

>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=4)
>>> emb = tpsurgery.apply(model, "prompt: 'This sentence : <PST> {text} means'\\ntp: {start: 1, stop: 3}\\n"
...                              "exit_layer: 3", tokenizer=tok)
>>> with emb.trace(["a b", "c d e"]) as run:
...     attn = run.layers[1].self_attn.output[0].save()   # an envoy value under TP
...     h3 = run.hidden_state(3).save()                    # hidden_states[3], as the recipe reads it
>>> attn.shape, h3.shape, run.batch.placeholders.tolist(), run.last
(torch.Size([2, 29, 32]), torch.Size([2, 29, 32]), [[18], [16]], 28)
>>> bool((run.embeddings - h3[:, run.last]).abs().max() < 1e-6)   # last-token pooling of what you saved
True
>>> bool((run.embeddings - emb.encode(["a b", "c d e"], convert_to_tensor=True)).abs().max() < 1e-5)
True

On the TransformerLens backend, :func:`hooks` gives the same interventions as a ``fwd_hooks`` list for
``bridge.run_with_hooks``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from . import foreign
from .arch import get_path
from .backends.hooked import batch_to
from .backends.nnsight_backend import trace_visitor
from .backends.walk import Schedule, Walk, model_inputs, read_point, run_captures, schedule
from .errors import BackendError, InputError
from .masks import layer_masks, mask_position
from .placement import input_device
from .batch import Batch, collate
from .resources import check_texts, eval_mode


def recipe_batch(emb: Any, texts: str | Sequence[str], template: int | None = None) -> Batch:
    """``texts`` in one of the recipe's prompts (``template``: its index; needed when the recipe has several) as one
    :class:`~tpsurgery.batch.Batch` in the given order, on the device of the model's embedding, auxiliary runs'
    prompts included."""
    texts = [texts] if isinstance(texts, str) else check_texts(texts)
    if not texts:
        raise InputError(None, "no texts to run")
    templates = emb.recipe.templates
    if template is None and len(templates) > 1:
        raise InputError(None, f"the recipe has {len(templates)} prompts and encode averages over them; pick one with "
                               f"template=0..{len(templates) - 1}")
    k = template or 0
    if isinstance(template, bool) or not isinstance(k, int) or not 0 <= k < len(templates):
        raise InputError(None, f"template={k}: the recipe has {len(templates)} prompt(s) (0..{len(templates) - 1})")
    plan = emb.plan
    rows = emb.tokenize_with_runs(texts, templates[k], plan)
    if plan.pooling == "mean":
        for i, r in enumerate(rows):
            if r.text_span[0] == r.text_span[1]:
                raise InputError(i, "mean pooling needs at least one sentence token")
    batch = collate(rows, emb.pad_id, plan.reach, hide_placeholders=plan.hide_placeholders,
                    min_length=plan.min_length)
    return batch_to(batch, input_device(emb.model, emb.spec))


class _Parts:
    """What a composed run knows besides the model: its batch, schedule and walk state."""

    def _setup(self, emb: Any, batch: Batch, plan_schedule: Schedule, walk: Walk) -> None:
        self.embedder, self.batch, self.plan = emb, batch, emb.plan
        self._schedule, self._walk = plan_schedule, walk

    @property
    def last(self) -> int:
        """The column of every row's last token (rows are left-padded): what ``pooling: last`` reads."""
        return self.batch.input_ids.shape[1] - 1

    @property
    def sentence(self) -> list[tuple[int, int]]:
        """Each row's ``[start, end)`` columns of the sentence tokens (the last ``{text}`` slot)."""
        end = self.batch.text_end.tolist()
        n = self.batch.text_mask.sum(1).long().tolist()
        return [(e - k, e) for e, k in zip(end, n)]

    @property
    def embeddings(self) -> torch.Tensor:
        """``[B, d]`` float32: the recipe's pooled read, what ``emb.encode(texts)`` returns (after the block)."""
        walk = self._walk
        if len(walk.reads) > len(self._schedule.reads):
            raise BackendError("the recipe's hooks ran more than once: a composed run is one forward pass (make a "
                               "new one for each run)")
        if len(walk.reads) < len(self._schedule.reads):
            raise BackendError(f"the run ended before the recipe's read of hidden_states{list(self._schedule.reads)} "
                               f"({len(walk.reads)} of {len(self._schedule.reads)} reads happened): read embeddings "
                               "after the block, and stop the trace only after the exit layer")
        return walk.result(self._schedule, False, "a composed run")


@functools.cache
def _tracer_class() -> type:
    from nnsight.intervention.tracer import InterleavingTracer

    class RecipeTrace(_Parts, InterleavingTracer):
        """An nnsight ``InterleavingTracer`` that also holds the recipe's batch (``batch``, ``last``, ``sentence``),
        the model's envoy (``model``, and its decoder layers ``layers``) and, after the block, ``embeddings``.
        ``__enter__`` is nnsight's own (it captures the caller's frame); ``__exit__`` runs the block in eval mode."""

        def __exit__(self, *exc: Any) -> bool:
            with eval_mode(self.embedder.model):  # like encode: no dropout
                return super().__exit__(*exc)

        def hidden_state(self, j: int) -> Any:
            """``hidden_states[j]`` where the recipe reads it (inside the block): layer 0's input (``j = 0``), layer
            ``j - 1``'s output, or the final norm's output (``j = n_layers``), after the recipe's edits there."""
            n = self.plan.n_layers
            if not 0 <= j <= n:
                raise InputError(None, f"hidden_state({j}): the model has hidden_states[0..{n}]")
            layer, site = read_point(j, n)
            if site == "norm":
                return get_path(self.model, self.embedder.spec.norm).output
            if site == "layer_in":
                return self.layers[0].input
            out = self.layers[layer].output
            return out[0] if self.embedder.spec.tuple_output else out

    return RecipeTrace


def trace(emb: Any, texts: str | Sequence[str], template: int | None = None) -> Any:
    """An nnsight tracer of ``emb``'s model on ``texts`` in the recipe's prompt, the recipe's interventions in it
    (use as ``with trace(emb, texts) as run:``; :meth:`tpsurgery.Embedder.trace`)."""
    backend = emb.backend
    if backend.name != "nnsight":
        raise BackendError(f"emb.trace needs the nnsight backend (this embedder runs {backend.name}); on "
                           "TransformerLens use emb.hooks(texts) and bridge.run_with_hooks")
    foreign.check(backend)  # not inside another trace; nnsight edits on a child envoy are refused like in encode
    batch = recipe_batch(emb, texts, template)
    plan = emb.plan
    masks = layer_masks(emb.model, plan, batch)
    where = mask_position(get_path(emb.model, emb.spec.layers)[0]) if masks else 0
    with torch.no_grad(), eval_mode(emb.model):  # auxiliary prompt runs (Contrastive Prompting) first
        captured = run_captures(backend.engine(where), plan, batch)
    envoy = backend.envoy
    visit = trace_visitor(envoy, emb.spec, where)
    plan_schedule = schedule(plan)
    walk = Walk(plan, batch, captured, masks)

    from nnsight.intervention.interleaver import Mediator, OutOfOrderError

    def recipe() -> None:  # the recipe's edits and reads, as an nnsight edit's body (no stop: the model runs on)
        try:
            for point in plan_schedule.points:
                visit(point, walk)
        except OutOfOrderError:  # the user's run.stop() before the exit: the short walk makes embeddings say so
            return

    twin = envoy._shallow_copy()  # its own edit list: the envoy's stored edits, then the recipe's
    twin._edits = [*twin._edits, Mediator(compile("__tpsurgery_recipe__()", "<tpsurgery recipe>", "exec"),
                                          {"__tpsurgery_recipe__": recipe}, {}, copy=True)]
    tracer = twin.trace(**model_inputs(batch), tracer_cls=_tracer_class())
    tracer._setup(emb, batch, plan_schedule, walk)
    tracer.model, tracer.layers = envoy, get_path(envoy, emb.spec.layers)
    return tracer


class HookRun(_Parts):
    """The recipe on a TransformerLens bridge as ``fwd_hooks`` (:func:`hooks`): pass ``fwd_hooks`` (plus yours) and
    ``inputs`` to ``bridge.run_with_hooks`` once; then ``embeddings`` is the recipe's read. The call is yours: run it
    under ``torch.no_grad()`` with the model in eval mode (as ``encode`` does) to get ``encode``'s numbers.

    >>> import tpsurgery, torch
    >>> from tpsurgery.testing import tiny_model
    >>> model, tok = tiny_model("llama", n_layers=2)
    >>> tl = tpsurgery.apply(model, "prompt: '<PST> {text} means'\\ntp: {start: 0, stop: 1}\\nexit_layer: 2",
    ...                      tokenizer=tok, backend="transformer_lens")
    >>> run, seen = tl.hooks(["a b"]), []
    >>> with torch.no_grad():
    ...     _ = run.bridge.run_with_hooks(**run.inputs, return_type=None, fwd_hooks=run.fwd_hooks
    ...                                   + [("blocks.1.attn.hook_pattern", lambda t, hook: seen.append(t.shape))])
    >>> seen, bool((run.embeddings - tl.encode(["a b"], convert_to_tensor=True)).abs().max() < 1e-5)
    ([torch.Size([1, 4, 11, 11])], True)
    """

    def __init__(self, emb: Any, batch: Batch, fwd_hooks: list, plan_schedule: Schedule, walk: Walk):
        self._setup(emb, batch, plan_schedule, walk)
        self.fwd_hooks = fwd_hooks
        self.bridge = emb.backend.bridge

    @property
    def inputs(self) -> dict[str, Any]:
        """Keyword arguments of ``bridge.run_with_hooks``: ``input`` (token ids), ``attention_mask``,
        ``position_ids``, ``use_cache=False``."""
        kw = model_inputs(self.batch)
        return {"input": kw.pop("input_ids"), **kw}


def hooks(emb: Any, texts: str | Sequence[str], template: int | None = None) -> HookRun:
    """The recipe's interventions on ``texts`` as TransformerLens hooks (:meth:`tpsurgery.Embedder.hooks`)."""
    backend = emb.backend
    if backend.name != "transformer_lens":
        raise BackendError(f"emb.hooks gives TransformerLens hook points, but this embedder runs {backend.name}: use "
                           "emb.trace(texts) (an nnsight trace), or apply(..., backend='transformer_lens')")
    foreign.check(backend)
    plan = emb.plan
    if plan.needs_masks:
        field = plan.at("attn_mask")[0].field
        raise BackendError(f"recipe field `{field}`: an attention-mask edit replaces the mask argument of the "
                           "bridge's attention (a forward pre-hook), which is no TransformerLens hook point; "
                           "emb.hooks cannot express it. Use emb.encode, or emb.trace on the nnsight backend")
    batch = recipe_batch(emb, texts, template)
    with torch.no_grad(), eval_mode(emb.model):
        captured = run_captures(backend.engine(), plan, batch)
    plan_schedule = schedule(plan)
    walk = Walk(plan, batch, captured)
    return HookRun(emb, batch, backend.fwd_hooks(plan_schedule, walk, stop=False), plan_schedule, walk)
