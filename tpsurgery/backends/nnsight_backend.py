"""The nnsight backend: one ``trace`` per batch runs a plan's schedule with fixed code.

The plan's schedule (:mod:`tpsurgery.backends.walk`: the edits, reads and stop of every hook point, in execution
order) is walked in the trace body: each site is an envoy value (embedding output, a layer's inputs and attention
mask, its o_proj input, its output, the final norm's output), read and, where edited, set again; ``tracer.stop()``
after the last point, so that later layers, the final norm (unless it is read) and the LM head never run. Rows that
edits take from auxiliary prompt runs are captured first, by a trace of each run along its capture schedule.

Runs that start at layer 0 take the trace-free fast path by default: the same schedule with PyTorch hooks on the
touched modules only (:mod:`tpsurgery.backends.hooked`), bit-identical to the trace without nnsight's per-module
wrappers (docs/performance.md). ``backend.fast_path = False`` traces every batch; a run resumed at a layer
(``run_part`` with ``start``) is always traced (nnsight's ``Envoy.skip`` skips the layers before it); so is a model
that carries foreign PyTorch hooks or nnsight edits (:mod:`tpsurgery.foreign`), which the trace honours in one order.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..arch import ArchSpec, arch_for, attn_out_module, embed_site, get_path
from ..errors import BackendError, TpsurgeryError
from ..foreign import carried
from ..batch import Batch
from ..plan import Plan
from ..prefix import Prefix
from ..masks import layer_masks, mask_position, replace_mask
from ..placement import input_device
from .hooked import batch_to, hook_engine
from .walk import Engine, Point, Schedule, Walk, model_inputs, run_plan


def _is_nnsight(forward: Any) -> bool:
    return forward is not None and type(forward).__module__.startswith("nnsight")


class NNsightBackend:
    """Runs plans through ``nnsight.NNsight`` wrapped around an unmodified transformers model: a
    :class:`~tpsurgery.backends.ResumableBackend` (``run_part`` starts at a layer from another plan's hidden state)."""

    name = "nnsight"
    supports_prefix = True  # runs the rest of a sequence on top of a prompt prefix's keys/values (tpsurgery.prefix)

    def __init__(self, model: Any, envoy: Any | None = None, spec: ArchSpec | None = None, fast_path: bool = True):
        self.model = model
        self.fast_path = fast_path  # plain runs with hooks on the touched modules, no trace (tpsurgery.backends.hooked)
        self.spec = spec or arch_for(model)
        self._owns_envoy = envoy is None
        self._envoy = envoy
        self._forwards: dict = {}
        self.n_layers = len(get_path(model, self.spec.layers))

    @property
    def envoy(self) -> Any:
        """The nnsight wrapper (created on first use when the caller passed a bare transformers model)."""
        if self._envoy is None:
            import nnsight

            # forwards already on instances (accelerate's device-alignment wrappers of a device_map'ed model, ...):
            # nnsight takes their slot, close() puts them back
            self._forwards = {m: f for m in self.model.modules()
                              if (f := vars(m).get("forward")) is not None and not _is_nnsight(f)}
            self._envoy = nnsight.NNsight(self.model)
        return self._envoy

    def close(self) -> None:
        """Take nnsight's per-module ``forward`` wrappers off the model again (only those this backend put there).

        ``nnsight.NNsight(model)`` sets ``forward`` and ``__nnsight__`` on every module instance; they pass calls
        through unchanged, but the model object is only exactly as it was once they are gone. Forwards that were on
        instances before (accelerate's device hooks of a ``device_map`` model) are put back. A later ``run`` wraps
        the model again.
        """
        if not self._owns_envoy or self._envoy is None:
            return
        for module in self.model.modules():
            attrs = vars(module)
            if _is_nnsight(attrs.get("forward")):
                del module.forward
                if module in self._forwards:
                    module.forward = self._forwards[module]
            attrs.pop("__nnsight__", None)
        self._envoy, self._forwards = None, {}

    def run(self, plan: Plan, batch: Batch, all_layers: bool = False, prefix: Prefix | None = None) -> torch.Tensor:
        return self._call(plan, batch, all_layers, prefix)[0]

    def run_part(self, plan: Plan, batch: Batch, start: int = 0, hidden: torch.Tensor | None = None,
                 keep: tuple[int, ...] = (), prefix: Prefix | None = None
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One part of a shared sweep (:func:`tpsurgery.sharing.share`): ``[B, n, d]`` pooled reads of
        ``hidden_states[start + 1 .. M]`` (``[0 .. M]`` when ``start`` is 0), and ``{j: hidden_states[j]}`` for the
        layers in ``keep`` (whole sequences, before this plan's edits of layer ``j``).

        ``start > 0``: decoder layers ``< start`` do not run; ``hidden`` (``hidden_states[start]`` of a plan that
        agrees with this one on those layers) is what they would have returned.
        """
        return self._call(plan, batch, True, prefix, start, hidden, keep)

    def _call(self, plan, batch, all_layers, prefix, start=0, hidden=None, keep=()):
        device = input_device(self.model, self.spec)  # a device_map'ed model: where the embedding runs
        on_device = batch_to(batch, device)  # every tensor copied once (pinned, non-blocking on CUDA)
        kwargs = model_inputs(on_device)
        if prefix is not None:  # batch holds the rows after the shared prefix; indices are relative to it
            if plan.needs_masks:
                raise BackendError("prefix reuse cannot be combined with attention-mask edits")
            kwargs = prefix.model_inputs(batch, device)
        masks = layer_masks(self.model, plan, on_device)  # {layer: its edited mask}; {} without mask edits
        where = mask_position(get_path(self.model, self.spec.layers)[0]) if masks else 0
        engine = self.engine(where, start, hidden.to(device) if start else None)
        try:
            with torch.no_grad():
                return run_plan(engine, plan, on_device, kwargs, all_layers, start, keep, masks,
                                type(self.model).__name__)
        except TpsurgeryError:
            raise
        except Exception as exc:  # nnsight re-raises model errors from its worker; add context
            raise BackendError(f"nnsight backend failed on a batch of {batch.size}: {type(exc).__name__}: {exc}") from exc

    def engine(self, where: int = 0, start: int = 0, hidden: torch.Tensor | None = None) -> Engine:
        """The engine a run takes: the hook fast path, or one nnsight trace when the fast path is off, the run is
        resumed at ``start`` (``hidden``: what skipped layers return) or the model carries foreign hooks / nnsight
        edits (the trace honours both in one order, :mod:`tpsurgery.foreign`). ``where``: the positional index of a
        decoder layer's ``attention_mask`` argument."""
        if self.fast_path and not start and not carried(self.model, self._envoy).any:
            return hook_engine(self.model, self.spec, where)
        return self._trace_engine(where, hidden)

    def _trace_engine(self, where: int, hidden: torch.Tensor | None) -> Engine:
        """The engine that runs a schedule as one nnsight trace: each point visited in the trace body
        (:func:`trace_visitor`), then ``tracer.stop()`` after the last point."""
        envoy = self.envoy
        visit = trace_visitor(envoy, self.spec, where, hidden)

        def run(plan_schedule: Schedule, walk: Walk, kwargs: dict) -> None:
            with envoy.trace(**kwargs) as tracer:
                for point in plan_schedule.points:
                    visit(point, walk)
                tracer.stop()

        return run


def trace_visitor(envoy: Any, spec: ArchSpec, where: int = 0, hidden: torch.Tensor | None = None
                  ) -> Callable[[Point, Walk], None]:
    """``visit(point, walk)`` for the body of an nnsight trace of ``envoy`` (this engine's site-to-hook table): each
    point's site is an envoy value (embedding output, a layer's inputs and attention mask, its o_proj input, its
    output, the final norm's output), read, handed to :meth:`Walk.at` and set again where edited. ``hidden``: what
    skipped layers return (a resumed run). Used by the backend's trace and by :mod:`tpsurgery.compose` (the recipe's
    interventions inside a user's own trace)."""
    layers = get_path(envoy, spec.layers)
    skipped = (hidden,) if spec.tuple_output else hidden

    def visit(point: Point, walk: Walk) -> None:
        i, site = point.layer, point.site
        if site == "layer":
            layers[i].skip(skipped)
        elif site == "attn_mask":
            layers[i].inputs = replace_mask(layers[i].inputs, walk.masks[i], where)
        elif site == "layer_out":
            out = layers[i].output
            h = out[0] if spec.tuple_output else out
            new = walk.at(point, h)
            if new is not h:
                layers[i].output = (new, *out[1:]) if spec.tuple_output else new
        else:
            module = (get_path(envoy, embed_site(spec)[0]) if site == "embed" else get_path(envoy, spec.norm)
                      if site == "norm" else layers[i] if site == "layer_in"
                      else attn_out_module(spec, layers[i], i, point.field))
            if site == "norm" or site == "embed" and embed_site(spec)[1] == "output":
                h = module.output
                new = walk.at(point, h)
                if new is not h:
                    module.output = new
            else:
                h = module.input
                new = walk.at(point, h)
                if new is not h:
                    module.input = new

    return visit
