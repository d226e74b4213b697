"""Baselines for the benchmark: the same recipe run by plain PyTorch forward hooks, and a naive full HF forward.

Both plug into an :class:`tpsurgery.Embedder` as its backend, so tokenization, deduplication and length-sorted batching
are identical to the nnsight engine's: the benchmark then measures the engine and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch

from tpsurgery.arch import arch_for, get_path
from tpsurgery.backends.pooling import pool
from tpsurgery.backends.surgery import apply_edits
from tpsurgery.errors import BackendError
from tpsurgery.batch import Batch
from tpsurgery.plan import Plan


class _Stop(Exception):
    pass


class HookBackend:
    """The plan's edits (sites embed, layer_in, layer_out) by plain forward (pre-)hooks and an early stop by exception (batched)."""

    name = "hooks"

    def __init__(self, model: Any):
        self.model = model
        self.spec = arch_for(model)
        self.layers = get_path(model, self.spec.layers)
        self.embed = get_path(model, self.spec.embed)
        self.norm = get_path(model, self.spec.norm)

    def run(self, plan: Plan, batch: Batch, all_layers: bool = False, **_: Any) -> torch.Tensor:
        device = next(self.model.parameters()).device
        handles = []
        got: list[torch.Tensor] = []
        for layer, sites in plan.by_layer().items():  # the plan's edits, each applied by the engine's own op code
            for site, edits in sites.items():
                if site == "embed":
                    handles.append(self.embed.register_forward_hook(
                        lambda m, a, out, e=edits: apply_edits(out, e, batch)))
                elif site == "layer_in":
                    handles.append(self.layers[layer].register_forward_pre_hook(
                        lambda m, args, e=edits: (apply_edits(args[0], e, batch), *args[1:])))
                elif site == "layer_out":
                    handles.append(self.layers[layer].register_forward_hook(
                        lambda m, a, out, e=edits: apply_edits(out, e, batch)))
                else:
                    raise BackendError(f"the hook baseline has no site {site!r} (embed, layer_in, layer_out only)",
                                       layer)
        m = plan.exit_layer

        def read(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            got.append(pool(h, plan, batch))
            raise _Stop

        if m == 0:
            handles.append(self.layers[0].register_forward_pre_hook(lambda mod, args: read(mod, args, args[0])))
        else:
            handles.append((self.norm if m == plan.n_layers else self.layers[m - 1]).register_forward_hook(read))
        try:
            with torch.no_grad():
                self.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                           position_ids=batch.position_ids.to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return got[0]


class FullForwardBackend:
    """The naive way: one full HF forward (every layer, final norm, LM head) with ``output_hidden_states=True``."""

    name = "hf-full-forward"

    def __init__(self, model: Any):
        self.model = model

    def run(self, plan: Plan, batch: Batch, all_layers: bool = False, **_: Any) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                             position_ids=batch.position_ids.to(device), use_cache=False, output_hidden_states=True)
        return pool(out.hidden_states[plan.exit_layer], plan, batch)
