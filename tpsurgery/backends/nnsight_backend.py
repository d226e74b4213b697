"""The nnsight backend: one ``trace`` per batch runs a plan with fixed code.

The trace body below is the whole engine: it walks the plan's edits in execution order, mapping each site to a hook
point (embedding output, a layer's inputs and attention mask, its o_proj input, its output) through the architecture
table and applying the edits with :func:`tpsurgery.backends.surgery.apply_edits`; reads the exit layer, then calls
``tracer.stop()`` so that later layers, the final norm (unless it is the exit) and the LM head never run. Rows that
edits take from auxiliary prompt runs are captured first, by a trace of each run that stops after its last site.

Plain runs (``run``, not a resumed part of a shared sweep) take the trace-free fast path by default: the same edits,
captures and early exit with PyTorch hooks on the touched modules only (:mod:`tpsurgery.backends.hooked`), bit-identical
to the trace without nnsight's per-module wrappers (docs/performance.md). ``backend.fast_path = False`` traces every
batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..arch import ArchSpec, arch_for, attn_out_module, get_path
from ..errors import BackendError, TpsurgeryError
from ..plan import Batch, Plan
from ..prefix import Prefix
from ..masks import layer_masks, mask_position, replace_mask
from ..placement import input_device
from .hooked import batch_to, capture_hooked, run_hooked
from .pooling import pool
from .surgery import apply_edits, capture


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
        kwargs = dict(
            input_ids=on_device.input_ids,
            attention_mask=on_device.attention_mask,
            position_ids=on_device.position_ids,
            use_cache=False,
        )
        if prefix is not None:  # batch holds the rows after the shared prefix; indices are relative to it
            if plan.needs_masks:
                raise BackendError("prefix reuse cannot be combined with attention-mask edits")
            kwargs = prefix.model_inputs(batch, device)
        try:
            if self.fast_path and not start and not keep:
                return self._hooked(plan, on_device, all_layers, kwargs, device), {}
            return self._trace(plan, batch, all_layers, kwargs, start, hidden, keep)
        except TpsurgeryError:
            raise
        except Exception as exc:  # nnsight re-raises model errors from its worker; add context
            raise BackendError(f"nnsight backend failed on a batch of {batch.size}: {type(exc).__name__}: {exc}") from exc

    def _hooked(self, plan: Plan, batch: Batch, all_layers: bool, kwargs: dict, device: torch.device) -> torch.Tensor:
        masks = layer_masks(self.model, plan, batch) if plan.needs_masks else {}  # {layer: its edited mask}
        where = mask_position(get_path(self.model, self.spec.layers)[0]) if masks else 0
        with torch.no_grad():
            captured = capture_hooked(self.model, self.spec, plan, batch, device) if plan.runs else {}
            return run_hooked(self.model, self.spec, plan, batch, all_layers, kwargs, masks, where, captured)

    def _capture(self, plan: Plan, batch: Batch) -> dict:
        """Rows that ``add`` / ``subtract`` edits take from auxiliary runs: each run is traced on its own batch up to
        the last site it must provide, then stopped."""
        layers = get_path(self.envoy, self.spec.layers)
        out = {}
        for run, _ in plan.runs:
            aux = batch.other(run)
            device = input_device(self.model, self.spec)
            wanted = plan.captures(run)
            with torch.no_grad(), self.envoy.trace(input_ids=aux.input_ids.to(device),
                                                   attention_mask=aux.attention_mask.to(device),
                                                   position_ids=aux.position_ids.to(device), use_cache=False) as tracer:
                for site, i, rows in wanted:
                    h = self._site(site, layers, i)
                    out[(run, site, i, rows)] = capture(h[0] if site == "layer_out" and self.spec.tuple_output else h,
                                                       rows, aux).save()
                tracer.stop()
        return out

    def _site(self, site: str, layers: Any, i: int) -> Any:
        """The envoy value of a site (read access)."""
        if site == "embed":
            return get_path(self.envoy, self.spec.embed).output
        if site == "layer_in":
            return layers[i].input
        if site == "attn_out_in":
            return attn_out_module(self.spec, layers[i], i).input
        return layers[i].output

    def _trace(self, plan: Plan, batch: Batch, all_layers: bool, kwargs: dict, start: int = 0,
               hidden: torch.Tensor | None = None, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict]:
        layers = get_path(self.envoy, self.spec.layers)
        embed = get_path(self.envoy, self.spec.embed)
        norm = get_path(self.envoy, self.spec.norm)
        tuple_out = self.spec.tuple_output
        m = plan.exit_layer
        by_layer = plan.by_layer()  # {layer: {site: edits}}
        captured = self._capture(plan, batch) if plan.runs else {}
        reads, kept = [], {}
        masks = layer_masks(self.model, plan, batch) if plan.needs_masks else {}  # {layer: its edited mask}
        where = mask_position(get_path(self.model, self.spec.layers)[0]) if masks else 0
        heads = plan.n_heads
        if start:
            hidden = hidden.to(input_device(self.model, self.spec))
            skipped = (hidden,) if tuple_out else hidden
        with torch.no_grad(), self.envoy.trace(**kwargs) as tracer:
            if not start and by_layer.get(0, {}).get("embed"):
                embed.output = apply_edits(embed.output, by_layer[0]["embed"], batch, captured)
            for i in range(plan.layers_run):
                if i < start:  # resumed: these layers do not run; the last one "returns" hidden_states[start]
                    layers[i].skip(skipped)
                    continue
                edits = by_layer.get(i, {})
                if i in masks:
                    layers[i].inputs = replace_mask(layers[i].inputs, masks[i], where)
                if all_layers and i == 0:
                    reads.append(pool(layers[0].input, plan, batch).save())
                if "layer_in" in edits:
                    layers[i].input = apply_edits(layers[i].input, edits["layer_in"], batch, captured)
                if "attn_out_in" in edits:
                    proj = attn_out_module(self.spec, layers[i], i, edits["attn_out_in"][0].field)
                    proj.input = apply_edits(proj.input, edits["attn_out_in"], batch, captured, heads)
                if "layer_out" in edits:
                    out = layers[i].output
                    new = apply_edits(out[0] if tuple_out else out, edits["layer_out"], batch, captured)
                    layers[i].output = (new, *out[1:]) if tuple_out else new
                read = all_layers and i < m - 1 or (i == m - 1 and m < plan.n_layers)  # hidden_states[i + 1]
                if read or i + 1 in keep:
                    out = layers[i].output[0] if tuple_out else layers[i].output
                    if i + 1 in keep:
                        kept[i + 1] = out.clone().save()
                    if read:
                        reads.append(pool(out, plan, batch).save())
            if m == 0:  # no layer runs: the read is layer 0's input (also the only all_layers slice)
                reads.append(pool(layers[0].input, plan, batch).save())
            elif m == plan.n_layers:
                reads.append(pool(norm.output, plan, batch).save())
            tracer.stop()
        # a device_map'ed model reads each layer on its own device
        return (torch.stack([r.to(reads[0].device) for r in reads], 1) if all_layers else reads[-1]), kept
