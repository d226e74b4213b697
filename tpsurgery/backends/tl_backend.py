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

One ``run_with_hooks`` call per batch runs the plan's schedule (:mod:`tpsurgery.backends.walk`, the same as the
nnsight backend's): each site maps to a hook point (:data:`SITE_HOOKS`: ``hook_embed``, ``blocks.{i}.hook_resid_pre``,
``blocks.{i}.attn.o.hook_in`` (heads flattened head-major, as in HF), ``blocks.{i}.hook_resid_post``,
``ln_final.hook_out``) and the hook of the last point ends the pass (auxiliary prompt runs the same way along their
capture schedules), so layers after the exit and the unembedding never run.
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
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..arch import ArchSpec, arch_for
from ..errors import BackendError, ModelError, TpsurgeryError
from ..masks import layer_masks
from ..placement import input_device
from ..batch import Batch
from ..plan import Plan
from ..prefix import Prefix
from .hooked import batch_to
from .walk import Schedule, Stop, Walk, flatten_heads, model_inputs, run_plan, unflatten_heads

# schedule sites -> TransformerLens hook points (attention-mask points go through a pre-hook on blocks.{i}.attn)
SITE_HOOKS = {"embed": "hook_embed", "layer_in": "blocks.{i}.hook_resid_pre", "attn_out_in": "blocks.{i}.attn.o.hook_in",
              "layer_out": "blocks.{i}.hook_resid_post", "norm": "ln_final.hook_out"}


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
        on_device = batch_to(batch, input_device(self.model, self.spec))
        try:
            masks = layer_masks(self.model, plan, on_device)  # {layer: its edited mask}; {} without mask edits
            with torch.no_grad():
                return run_plan(self._engine, plan, on_device, model_inputs(on_device), all_layers, masks=masks,
                                where=self.architecture)[0]
        except TpsurgeryError:
            raise
        except Exception as exc:
            raise BackendError(f"transformer_lens backend failed on a batch of {batch.size} "
                               f"({self.architecture}): {type(exc).__name__}: {exc}") from exc

    def engine(self, where: int = 0) -> Any:
        """The engine of this backend's runs (:data:`~tpsurgery.backends.walk.Engine`; ``where`` is unused: the mask
        goes to the attention's keyword)."""
        return self._engine

    def _engine(self, plan_schedule: Schedule, walk: Walk, kwargs: dict) -> None:
        """Run the bridge once along a schedule: :meth:`fwd_hooks`, the last one raising
        :class:`~tpsurgery.backends.walk.Stop`; mask points hand the attention its edited mask."""
        points = plan_schedule.points
        kw = dict(kwargs)
        try:
            with self._mask_edits([p for p in points if p.site == "attn_mask"], walk.masks):
                self.bridge.run_with_hooks(kw.pop("input_ids"), fwd_hooks=self.fwd_hooks(plan_schedule, walk),
                                           return_type=None, **kw)
        except Stop:
            pass

    def fwd_hooks(self, plan_schedule: Schedule, walk: Walk, stop: bool = True) -> list[tuple[str, Any]]:
        """``[(hook point, function)]`` for ``run_with_hooks``: one per point of the schedule (:data:`SITE_HOOKS`;
        ``attn_mask`` points are not hook points and are left out), each handing its tensor to :meth:`Walk.at`;
        with ``stop`` the last one raises :class:`~tpsurgery.backends.walk.Stop` (used by
        :mod:`tpsurgery.compose` without it: the user's run goes on)."""
        points = plan_schedule.points
        hooks = []
        for k, point in enumerate(points):
            if point.site == "attn_mask":
                continue
            if point.site not in SITE_HOOKS:
                raise BackendError(f"the transformer_lens backend cannot run schedule point {point}", point.layer)
            fn = walk.hook(point, stop and k == len(points) - 1)

            def hook(t, hook, fn=fn):
                flat = flatten_heads(t)
                new = fn(flat)
                return None if new is flat else unflatten_heads(new, t.shape)

            hooks.append((self._hook_point(point.site, point.layer), hook))
        return hooks

    def _hook_point(self, site: str, i: int) -> str:
        """The hook point of an edit site (:data:`SITE_HOOKS`); ``embed`` is ``blocks.0.hook_resid_pre`` in a family
        that scales the embedding before layer 0 (``ArchSpec.scaled_embed``: Granite), where it is hidden_states[0]."""
        if site == "embed" and self.spec.scaled_embed:
            return SITE_HOOKS["layer_in"].format(i=0)
        return SITE_HOOKS[site].format(i=i)

    def _attention(self, layer: int, field: str) -> Any:
        attn = getattr(self.bridge.blocks[layer], "attn", None)
        if attn is None:
            raise BackendError(f"recipe field `{field}`: the TransformerLens adapter of {self.architecture} exposes "
                               f"no attention component (blocks.{layer}.attn) to take an edited mask; use the nnsight "
                               "backend", layer)
        return attn

    @contextmanager
    def _mask_edits(self, points: list, masks: dict) -> Iterator[None]:
        """Forward pre-hooks that hand the scheduled layers' attention the edited mask; always removed on exit."""
        handles = []
        try:
            for point in points:
                attn = self._attention(point.layer, point.field)
                handles.append(attn.register_forward_pre_hook(self._mask_hook(masks[point.layer], point.layer,
                                                                              point.field), with_kwargs=True))
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
