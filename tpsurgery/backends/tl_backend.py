"""The TransformerLens backend: the same plan as TransformerLens hooks on a ``TransformerBridge``.

>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama")
>>> recipe = "prompt: 'This sentence : <PST> \\"{text}\\" means'\\ntp: {start: 1, stop: 3}\\nexit_layer: 3"
>>> tl = tpsurgery.apply(model, recipe, tokenizer=tok, backend="transformer_lens")
>>> nn = tpsurgery.apply(model, recipe, tokenizer=tok)
>>> tl.backend.name, type(tl.backend.bridge).__name__, tl.encode(["a b", "c"]).shape
('transformer_lens', 'TransformerBridge', (2, 32))
>>> bool(abs(tl.encode(["a b", "c"]) - nn.encode(["a b", "c"])).max() < 1e-5)
True
>>> model.config._attn_implementation, type(model.model.layers[0]).__name__   # the user's model is untouched
('sdpa', 'LlamaDecoderLayer')

One ``run_with_hooks`` call per batch: each edit site maps to a hook point (:data:`SITE_HOOKS`: ``hook_embed``,
``blocks.{i}.hook_resid_pre``, ``blocks.{i}.attn.o.hook_in``, ``blocks.{i}.hook_resid_post``) whose hook applies the
edits with the same :mod:`~tpsurgery.backends.surgery` functions as the nnsight backend (auxiliary prompt runs are
captured first by runs that stop after their last site), and ``stop_at_layer=M`` ends the pass at
the exit layer (for ``M == n_layers`` the ``ln_final.hook_out`` read ends it, so the unembedding never runs).
Attention-mask edits hand the bridge's attention component of each scheduled layer the mask that
:func:`tpsurgery.masks.layer_masks` builds for the nnsight backend (a forward pre-hook on ``blocks.{i}.attn``
replaces its ``attention_mask``): ``hook_attn_scores`` fires after the mask has been added, so it could hide a
position but never un-hide one.

Booting a bridge mutates the Hugging Face model it wraps (eager attention, submodules replaced by bridge
components). :func:`boot_bridge` therefore boots a copy (modules, config and buffers copied, weight tensors
shared) and hands TransformerLens a reloaded copy of the tokenizer; a bridge given by the user is used as it is and left
as found (every hook this backend adds is removed, also when a run fails).
"""

from __future__ import annotations

import copy
import functools
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..arch import ArchSpec, arch_for
from ..edits import SITES
from ..errors import BackendError, ModelError, TpsurgeryError
from ..placement import input_device
from ..plan import Batch, Plan
from ..prefix import Prefix
from .pooling import pool
from .surgery import apply_edits, capture

# edit sites -> TransformerLens hook points (attention-mask edits go through a pre-hook on blocks.{i}.attn)
SITE_HOOKS = {"embed": "hook_embed", "layer_in": "blocks.{i}.hook_resid_pre", "attn_out_in": "blocks.{i}.attn.o.hook_in",
              "layer_out": "blocks.{i}.hook_resid_post"}


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[B, L, heads, d_head]`` (TransformerLens's o_proj input) -> ``[B, L, heads * d_head]`` (head-major, as in HF)."""
    return t.reshape(*t.shape[:2], -1) if t.dim() == 4 else t


class _ExitReached(Exception):
    """Raised by the final-norm read hook: everything after it (the unembedding) is wasted work."""


def is_bridge(obj: Any) -> bool:
    """Whether ``obj`` is a TransformerLens ``TransformerBridge`` (checked without importing transformer_lens)."""
    return type(obj).__module__.startswith("transformer_lens") and hasattr(obj, "original_model") \
        and hasattr(obj, "run_with_hooks")


def boot_bridge(model: Any, tokenizer: Any) -> Any:
    """A ``TransformerBridge`` around a copy of a transformers causal LM; ``model`` and ``tokenizer`` stay as given.

    The copy is deep (modules, config, buffers) except for the parameters, which the bridge shares with ``model``:
    booting only swaps modules and the attention implementation, and shared weights cost no memory or time
    (SmolLM2-135M: a full deep copy took 4.5 s). Like the nnsight backend, the bridge therefore sees later
    in-place changes to the user's weights.
    TransformerLens reloads the tokenizer from disk (``add_bos_token=True``) and may change its padding side, so
    it gets a copy saved to a temporary folder; tpsurgery keeps tokenizing with the user's own tokenizer.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformer-lens is a dependency
        raise ModelError(f"backend='transformer_lens' needs the transformer-lens package ({exc})") from exc
    param = next(model.parameters())
    # A copy of the module tree, config and buffers that shares the weight tensors (booting never writes weights).
    twin = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    if not getattr(twin.config, "architectures", None):  # models built from a config carry no class name
        twin.config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory(prefix="tpsurgery-tl-") as folder:
        try:
            tokenizer.save_pretrained(folder)
            tl_tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise ModelError(f"cannot hand a copy of the tokenizer to TransformerLens ({type(exc).__name__}: {exc})") \
                from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return TransformerBridge.boot_transformers(folder, hf_model=twin, tokenizer=tl_tokenizer,
                                                           device=param.device, dtype=param.dtype)
        except Exception as exc:
            raise ModelError(f"TransformerLens cannot bridge {type(model).__name__} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from exc


class TransformerLensBackend:
    """Runs plans with ``run_with_hooks`` on a TransformerLens ``TransformerBridge`` (a
    :class:`~tpsurgery.backends.Backend`; no prompt-prefix reuse, no resumed runs)."""

    name = "transformer_lens"
    supports_prefix = False

    def __init__(self, bridge: Any, spec: ArchSpec | None = None):
        if not is_bridge(bridge):
            raise ModelError(f"the transformer_lens backend needs a TransformerBridge, got {type(bridge).__name__}")
        self.bridge = bridge
        self.model = bridge.original_model
        self.spec = spec or arch_for(self.model)
        self.n_layers = len(bridge.blocks)
        self.architecture = type(self.model).__name__

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any) -> "TransformerLensBackend":
        """The backend of a bridge booted from a copy of ``model`` (see :func:`boot_bridge`)."""
        return cls(boot_bridge(model, tokenizer))

    def close(self) -> None:
        """Nothing to undo: every hook is removed when its run ends, and the user's model was never wrapped."""

    def run(self, plan: Plan, batch: Batch, all_layers: bool = False, prefix: Prefix | None = None) -> torch.Tensor:
        """``[B, d]`` float32 pooled embeddings at the exit layer, or ``[B, M + 1, d]`` with ``all_layers``."""
        if prefix is not None:
            raise BackendError("the transformer_lens backend cannot run on a prompt prefix's keys/values "
                               "(supports_prefix is False)")
        device = input_device(self.model, self.spec)
        m, n = plan.exit_layer, self.n_layers
        reads: list[torch.Tensor] = []
        try:
            captured = self._capture(plan, batch) if plan.runs else {}
            hooks = self._hooks(plan, batch, all_layers, reads, captured)
            with torch.no_grad(), self._mask_edits(plan, batch):
                out = self.bridge.run_with_hooks(
                    batch.input_ids.to(device), fwd_hooks=hooks, return_type=None,
                    stop_at_layer=m if m < n else None, attention_mask=batch.attention_mask.to(device),
                    position_ids=batch.position_ids.to(device), use_cache=False,
                )
        except _ExitReached:
            out = None
        except TpsurgeryError:
            raise
        except Exception as exc:
            raise BackendError(f"transformer_lens backend failed on a batch of {batch.size} "
                               f"({self.architecture}): {type(exc).__name__}: {exc}") from exc
        if m < n:
            if not isinstance(out, torch.Tensor):
                raise BackendError(f"TransformerLens returned no residual at stop_at_layer={m} ({self.architecture})")
            reads.append(pool(out, plan, batch).clone())
        if len(reads) != (m + 1 if all_layers else 1):
            raise BackendError(f"expected {m + 1 if all_layers else 1} reads, got {len(reads)}: a hook did not fire "
                               f"on {self.architecture}")
        return torch.stack(reads, 1) if all_layers else reads[-1]

    def _capture(self, plan: Plan, batch: Batch) -> dict:
        """Rows that ``add`` / ``subtract`` edits take from auxiliary runs (each run stops after its last site)."""
        device = input_device(self.model, self.spec)
        out: dict = {}
        for run, _ in plan.runs:
            aux = batch.other(run)
            wanted = plan.captures(run)

            def grab(t, hook, key=None, last=False):
                out[key] = capture(_flat(t), key[3], aux)
                if last:
                    raise _ExitReached

            hooks = [(SITE_HOOKS[site].format(i=i), functools.partial(grab, key=(run, site, i, rows),
                                                                      last=k == len(wanted) - 1))
                     for k, (site, i, rows) in enumerate(wanted)]
            try:
                with torch.no_grad():
                    self.bridge.run_with_hooks(aux.input_ids.to(device), fwd_hooks=hooks, return_type=None,
                                               attention_mask=aux.attention_mask.to(device),
                                               position_ids=aux.position_ids.to(device), use_cache=False)
            except _ExitReached:
                pass
        return out

    def _hooks(self, plan: Plan, batch: Batch, all_layers: bool, reads: list, captured: dict) -> list:
        """``(hook name, function)`` pairs in firing order; a read at ``hook_resid_pre`` comes before that site's
        edits, a read at ``hook_resid_post`` after them (as ``hidden_states`` in the nnsight backend)."""
        m, n = plan.exit_layer, self.n_layers
        by_layer = plan.by_layer()

        def read(t, hook):
            reads.append(pool(t, plan, batch).clone())

        def read_and_exit(t, hook):
            read(t, hook)
            raise _ExitReached

        def edit(edits):
            return lambda t, hook: apply_edits(_flat(t), edits, batch, captured, plan.n_heads).reshape(t.shape)

        hooks: list = []
        if by_layer.get(0, {}).get("embed"):
            hooks.append(("hook_embed", edit(by_layer[0]["embed"])))
        for i in range(plan.layers_run):
            if all_layers and i == 0:
                hooks.append(("blocks.0.hook_resid_pre", read))
            for site, edits in sorted(by_layer.get(i, {}).items(), key=lambda kv: SITES.index(kv[0])):
                if site in SITE_HOOKS and site != "embed":
                    hooks.append((SITE_HOOKS[site].format(i=i), edit(edits)))
            if all_layers and i < m - 1:
                hooks.append((f"blocks.{i}.hook_resid_post", read))
        if m == n:
            hooks.append(("ln_final.hook_out", read_and_exit))
        return hooks

    def _attention(self, layer: int, field: str) -> Any:
        attn = getattr(self.bridge.blocks[layer], "attn", None)
        if attn is None:
            raise BackendError(f"recipe field `{field}`: the TransformerLens adapter of {self.architecture} exposes "
                               f"no attention component (blocks.{layer}.attn) to take an edited mask; use the nnsight "
                               "backend", layer)
        return attn

    @contextmanager
    def _mask_edits(self, plan: Plan, batch: Batch) -> Iterator[None]:
        """Forward pre-hooks that hand the scheduled layers' attention the edited mask; always removed on exit."""
        handles = []
        try:
            if plan.needs_masks:
                from ..masks import layer_masks

                for i, mask in layer_masks(self.model, plan, batch).items():
                    field = plan.at("attn_mask", i)[0].field
                    attn = self._attention(i, field)
                    handles.append(attn.register_forward_pre_hook(self._mask_hook(mask, i, field), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _mask_hook(self, mask: torch.Tensor, layer: int, field: str):
        def hook(module, args, kwargs):
            if "attention_mask" not in kwargs:
                raise BackendError(f"recipe field `{field}`: the attention of {self.architecture} takes no "
                                   "attention_mask keyword under TransformerLens; use the nnsight backend", layer)
            return args, {**kwargs, "attention_mask": mask}

        return hook
