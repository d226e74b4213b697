"""``tpsurgery.apply``: a recipe plus whatever model object a researcher holds -> an :class:`Embedder`.

>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("gpt2")
>>> tpsurgery.apply(model, "smollm2-prompteol", tokenizer=tok).plan.exit_layer
2
>>> tpsurgery.apply(42, "prompteol")
Traceback (most recent call last):
...
tpsurgery.errors.ModelError: cannot apply a recipe to int. Accepted: a transformers causal LM (PreTrainedModel), an nnsight NNsight/TransformersModel wrapping one, a TransformerLens TransformerBridge, a model name or path (Hugging Face id, local folder, .gguf file, or 'smollm2-135m')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .embedder import Embedder
from .effects import warn_inert
from .errors import ModelError
from .foreign import check_copy
from .models import DEFAULT_MODEL, load_model
from .library import load_recipe
from .recipe import Recipe, parse_recipe
from .sweep_store import resolve_auto_exit
from .versions import check_versions

BACKENDS = ("nnsight", "transformer_lens")
ACCEPTED = (
    "a transformers causal LM (PreTrainedModel), an nnsight NNsight/TransformersModel wrapping one, "
    "a TransformerLens TransformerBridge, "
    f"a model name or path (Hugging Face id, local folder, .gguf file, or {DEFAULT_MODEL!r})"
)


def as_recipe(recipe: Recipe | str | os.PathLike | dict) -> Recipe:
    """A Recipe from a Recipe, a mapping, a YAML file path, a shipped recipe name, or YAML text."""
    if isinstance(recipe, (Recipe, dict)):
        return parse_recipe(recipe)
    return load_recipe(recipe if isinstance(recipe, str) else Path(recipe))


def _tokenizer_for(model: Any) -> Any:
    from transformers import AutoTokenizer

    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not name:
        raise ModelError("cannot find a tokenizer for this model (it has no name_or_path): pass tokenizer=")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r} ({exc}): pass tokenizer=") from exc


def _dispatched(envoy: Any) -> Any:
    """The transformers model inside an nnsight wrapper, its real weights loaded: ``TransformersModel(name)`` without
    ``dispatch=True`` holds a weightless meta-device skeleton until its first trace, so dispatch it here."""
    if getattr(envoy, "dispatched", True) is False:
        try:
            envoy.dispatch()
        except Exception as exc:  # noqa: BLE001 - whatever loading raised, say how to load it
            raise ModelError(f"this nnsight {type(envoy).__name__} was never dispatched (its weights are on the meta "
                             f"device) and dispatching it failed ({type(exc).__name__}: {exc}); load it with "
                             "dispatch=True, e.g. nnsight.TransformersModel(name, task='text-generation', dispatch=True)") from exc
    return envoy._module


def _never_loaded(model: Any) -> bool:
    """Weights on the meta device that no accelerate hook will load (``device_map`` offloading keeps some there)."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return False
    return not any("_hf_hook" in vars(m) for m in model.modules())


def resolve_model(model: Any, tokenizer: Any = None, device: str | None = None) -> tuple[Any, Any, Any]:
    """``(hf_model, tokenizer, nnsight_envoy_or_None)`` from any accepted model object (names load on ``device``)."""
    from transformers import PreTrainedModel

    envoy = None
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tok = load_model(model, device=device)
        tokenizer = tokenizer or loaded_tok
    elif not isinstance(model, PreTrainedModel):
        inner = getattr(model, "_module", None)
        if inner is not None and isinstance(inner, PreTrainedModel) and type(model).__module__.startswith("nnsight"):
            envoy, model = model, _dispatched(model)
            tokenizer = tokenizer or getattr(envoy, "tokenizer", None)
        else:
            raise ModelError(f"cannot apply a recipe to {type(model).__name__}. Accepted: {ACCEPTED}")
    if _never_loaded(model):
        raise ModelError("the model's weights are on the meta device (never loaded): load them first, e.g. "
                         "nnsight.TransformersModel(name, task='text-generation', dispatch=True) or model.dispatch() for nnsight, or "
                         "AutoModelForCausalLM.from_pretrained(name)")
    if tokenizer is None:
        tokenizer = _tokenizer_for(model)
    return model, tokenizer, envoy


def apply(model: Any, recipe: Recipe | str | os.PathLike | dict, *, tokenizer: Any = None,
          backend: str | None = None, prefix_cache: bool | None = None, embedding_cache: Any = None,
          max_length: int | None = None) -> Embedder:
    """Compile ``recipe`` for ``model`` and return an :class:`Embedder`. Weights, config and hooks are never modified;
    nnsight's pass-through forward wrappers stay on the module instances until ``Embedder.close()`` (or ``with``).

    ``prefix_cache``: reuse the prompt prefix's keys/values where that is exact (see :mod:`tpsurgery.prefix`); the
    default ``None`` turns it on for models on the CPU only (on a GPU a small model is launch-bound and reuse measured
    no gain, docs/performance.md);
    ``embedding_cache``: ``True``, a folder or an :class:`~tpsurgery.cache.EmbeddingCache` to store embeddings on disk;
    ``max_length``: at most this many tokens per prompt (longer sentences are cut, with a warning), like
    sentence-transformers' ``max_seq_length``; default and upper bound: the model's limit.

    Warns (:class:`~tpsurgery.effects.InertEditWarning`) about edits the model cancels (:mod:`tpsurgery.effects`).

    Refuses (:class:`ModelError`) a transformers or nnsight outside the verified versions
    (:data:`tpsurgery.versions.VERIFIED`).

    ``backend``: ``nnsight`` (default) or ``transformer_lens`` (default for a ``TransformerBridge``; for any other
    model it bridges a copy, see :mod:`tpsurgery.backends.tl_backend`).
    """
    check_versions()  # a transformers / nnsight outside the verified range could give wrong numbers silently
    recipe = as_recipe(recipe)
    from .backends.tl_backend import is_bridge

    if is_bridge(model) or backend == "transformer_lens":
        hf_model, tokenizer, engine = _transformer_lens(model, tokenizer, backend)
    else:
        hf_model, tokenizer, envoy = resolve_model(model, tokenizer)
        if backend not in (None, "nnsight"):
            raise ModelError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        from .backends.nnsight_backend import NNsightBackend

        engine = NNsightBackend(hf_model, envoy=envoy)
    # the best exit layer of a stored sweep (tpsurgery sweep) for `exit_layer: auto`
    exit_layer = resolve_auto_exit(hf_model, recipe) if recipe.exit_layer == "auto" else None
    emb = Embedder(hf_model, tokenizer, recipe, engine, spec=engine.spec, prefix_cache=prefix_cache,
                   embedding_cache=embedding_cache, exit_layer=exit_layer, max_length=max_length)
    warn_inert(emb)  # an edit the model cancels (e.g. a scale before Gemma2's post-attention norm): one warning
    return emb


def _transformer_lens(model: Any, tokenizer: Any, backend: str | None) -> tuple[Any, Any, Any]:
    """``(hf_model, tokenizer, TransformerLensBackend)`` for a bridge, or for any other model (booted from a copy)."""
    from .backends.tl_backend import TransformerLensBackend, is_bridge

    if not is_bridge(model):
        hf_model, tokenizer, envoy = resolve_model(model, tokenizer)
        check_copy(hf_model, envoy)  # refuse now what a bridged copy cannot honour (tpsurgery.foreign)
        engine = TransformerLensBackend.from_model(hf_model, tokenizer)
        engine.copied_from = (hf_model, envoy)  # tpsurgery.foreign.check looks again at each encode
    elif backend not in (None, "transformer_lens"):
        raise ModelError(f"a TransformerBridge runs on the transformer_lens backend, not {backend!r} (booting "
                         "changed the wrapped model; pass the original transformers model for nnsight)")
    else:
        engine = TransformerLensBackend(model)
        if tokenizer is None:  # the model's own tokenizer, as nnsight would load it; TL's adds a BOS token
            try:
                tokenizer = _tokenizer_for(engine.model)
            except ModelError:
                tokenizer = model.tokenizer
                if tokenizer is None:
                    raise
    return engine.model, tokenizer, engine
