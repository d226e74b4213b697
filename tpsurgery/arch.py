"""Where a decoder keeps its layers, token embeddings and final norm: one small typed table.

Supporting a new decoder family is one call, not a code path (what the three paths leave open, whether a decoder
layer returns a tuple and where its attention output projection sits, is probed on the model by :func:`arch_for`):

>>> from tpsurgery.arch import ArchSpec, register_architecture, ARCHITECTURES
>>> register_architecture("my_decoder", ArchSpec("backbone.blocks", "backbone.embed", "backbone.norm_f"))
>>> ARCHITECTURES["my_decoder"].layers
'backbone.blocks'
>>> del ARCHITECTURES["my_decoder"]
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted attribute paths, from the ``*ForCausalLM`` object, of the pieces tpsurgery touches.

    ``layers``: the ``ModuleList`` of decoder layers; ``embed``: the token-embedding module (its output rows are where
    placeholders get their initial vectors); ``norm``: the final norm whose output HF reports as the last
    ``hidden_states`` entry; ``tuple_output``: the decoder layer returns a tuple whose first item is the hidden state
    (None: probed by :func:`arch_for` with one decoder-layer forward); ``attn_out``: path *from a decoder layer* to the
    attention output projection, whose input is the concatenated head outputs (edit site ``attn_out_in``; None: the
    family has none that tpsurgery knows; a path the model lacks is replaced by the first of :data:`ATTN_OUT_NAMES`
    it has); ``scaled_embed``: the model multiplies the embedding module's output before decoder layer 0 (Granite's
    ``embedding_multiplier``), so the ``embed`` site is decoder layer 0's input: it means ``hidden_states[0]`` there
    too (:func:`embed_site`).
    """

    layers: str
    embed: str
    norm: str
    tuple_output: bool | None = None
    attn_out: str | None = "self_attn.o_proj"
    scaled_embed: bool = False


_LLAMA_LIKE = ArchSpec("model.layers", "model.embed_tokens", "model.norm", tuple_output=False)

#: attention output projections by the names decoder families give them (path from a decoder layer)
ATTN_OUT_NAMES = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj", "self_attention.dense",
                  "attn.out_proj", "self_attn.dense", "attn.o_proj", "attention.o_proj", "attn.dense",
                  "attention.out_proj", "mixer.out_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi3", "olmo", "olmo2", "cohere", "stablelm", "starcoder2", "smollm3",
        )
    },
    "granite": ArchSpec("model.layers", "model.embed_tokens", "model.norm", tuple_output=False, scaled_embed=True),
    "gpt2": ArchSpec("transformer.h", "transformer.wte", "transformer.ln_f", False, attn_out="attn.c_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", False,
                         attn_out="attention.dense"),
    "opt": ArchSpec("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm", False,
                    attn_out="self_attn.out_proj"),
    "falcon": ArchSpec("transformer.h", "transformer.word_embeddings", "transformer.ln_f", tuple_output=True,
                       attn_out="self_attention.dense"),
}


_BUILTIN = frozenset(ARCHITECTURES.values())


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach tpsurgery a decoder family, keyed by ``config.model_type``."""
    if not isinstance(spec, ArchSpec):
        raise ModelError(f"register_architecture expects an ArchSpec, got {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


def embed_site(spec: ArchSpec) -> tuple[str, str]:
    """``(path, "output" | "input")``: where the ``embed`` edit site sits: the embedding module's output, or decoder
    layer 0's input in a family that scales the embedding in between (``scaled_embed``). Both are ``hidden_states[0]``.

    >>> embed_site(ARCHITECTURES["llama"]), embed_site(ARCHITECTURES["granite"])
    (('model.embed_tokens', 'output'), ('model.layers.0', 'input'))
    """
    return (f"{spec.layers}.0", "input") if spec.scaled_embed else (spec.embed, "output")


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (works on modules and on nnsight envoys alike)."""
    return functools.reduce(getattr, path.split("."), root)


def _has_path(root: Any, path: str) -> bool:
    try:
        get_path(root, path)
    except AttributeError:
        return False
    return True


def attn_out_module(spec: ArchSpec, layer: Any, index: int, field: str = "edits") -> Any:
    """The attention output projection of one decoder layer (a module or an nnsight envoy), or a ModelError."""
    if spec.attn_out is None or not _has_path(layer, spec.attn_out):
        where = f"has no {spec.attn_out!r}" if spec.attn_out else "names no attention output projection"
        raise ModelError(f"recipe field `{field}`: site attn_out_in needs the attention output projection of decoder "
                         f"layer {index}, but this architecture's table entry {where}; register one with "
                         "tpsurgery.register_architecture(model_type, ArchSpec(..., attn_out='path.from.layer'))")
    return get_path(layer, spec.attn_out)


def arch_for(model: Any) -> ArchSpec:
    """The ArchSpec of a transformers causal LM: its ``config.model_type`` row, else the first table row whose three
    paths it has; what the row leaves open (``tuple_output=None``, an ``attn_out`` path the model lacks) is probed on
    the model (:func:`probe`; once per model object). Table rows copied to another family are always probed, so a
    family that returns tuples where its look-alike does not is run right (or refused with a message naming
    ``tuple_output`` / ``register_architecture``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) if model_type else None
    if spec is not None and all(_has_path(model, p) for p in (spec.layers, spec.embed, spec.norm)):
        return _resolved(model, spec, model_type)
    for candidate in dict.fromkeys(ARCHITECTURES.values()):
        if all(_has_path(model, p) for p in (candidate.layers, candidate.embed, candidate.norm)):
            return _resolved(model, replace(candidate, tuple_output=None), model_type)
    families = ", ".join(sorted(ARCHITECTURES))
    raise ModelError(
        f"cannot locate the decoder layers of {type(model).__name__} (model_type={model_type!r}). "
        f"Supported families: {families}. Register a new one with "
        "tpsurgery.register_architecture(model_type, ArchSpec(layers=..., embed=..., norm=...)), "
        "giving dotted paths from the causal-LM object."
    )


_PROBED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _resolved(model: Any, spec: ArchSpec, model_type: str | None) -> ArchSpec:
    layer0 = get_path(model, spec.layers)[0]
    if spec.attn_out is not None and not _has_path(layer0, spec.attn_out):
        spec = replace(spec, attn_out=next((n for n in ATTN_OUT_NAMES if _has_path(layer0, n)), None))
    if spec.tuple_output is not None and spec in _BUILTIN:  # the shipped rows are tested on every family
        return spec
    try:
        memo = _PROBED.setdefault(model, {})
    except TypeError:  # not weak-referenceable: probe every time
        memo = {}
    if spec not in memo:
        found = probe(model, spec, model_type)
        if spec.tuple_output is not None and spec.tuple_output != found:
            raise ModelError(f"the architecture registered for model_type {model_type!r} says tuple_output="
                             f"{spec.tuple_output}, but decoder layer 0 of {type(model).__name__} returns "
                             f"{'a tuple' if found else 'the hidden state itself'}: register it with "
                             f"tpsurgery.register_architecture({model_type!r}, ArchSpec(..., tuple_output={found})) "
                             "or leave tuple_output unset (probed)")
        memo[spec] = replace(spec, tuple_output=found)
    return memo[spec]


class _Probed(Exception):
    """Raised by the probe's hook once decoder layer 0 has returned: nothing after it runs."""


def probe(model: Any, spec: ArchSpec, model_type: str | None = None) -> bool:
    """Whether decoder layer 0 returns a tuple (hidden state first) rather than the hidden state: one forward of a
    two-token input, stopped when that layer returns. A :class:`ModelError` naming ``tuple_output`` and
    ``register_architecture`` when the forward fails or the layer returns neither.

    >>> from tpsurgery.testing import tiny_model
    >>> probe(tiny_model("falcon", n_layers=1)[0], ARCHITECTURES["falcon"]), probe(tiny_model("llama", n_layers=1)[0], _LLAMA_LIKE)
    (True, False)
    """
    layer, seen = get_path(model, spec.layers)[0], []

    def keep(module: Any, args: Any, out: Any) -> None:
        seen.append(out)
        raise _Probed

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    fix = (f"register it with tpsurgery.register_architecture({model_type or 'model_type'!r}, ArchSpec("
           f"{spec.layers!r}, {spec.embed!r}, {spec.norm!r}, tuple_output=True or False))")
    handle = layer.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    except _Probed:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure of an unknown family's forward: say what to register
        raise ModelError(f"cannot probe whether decoder layer 0 of {type(model).__name__} returns a tuple "
                         f"(tuple_output): its forward failed ({type(exc).__name__}: {str(exc)[:200]}); {fix}") from exc
    finally:
        handle.remove()
    width = get_path(model, spec.embed).weight.shape[1]
    out = seen[0] if seen else None
    for is_tuple, h in ((False, out), (True, out[0] if isinstance(out, (tuple, list)) and out else None)):
        if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[-1] == width:
            return is_tuple
    raise ModelError(f"decoder layer 0 of {type(model).__name__} ({spec.layers}.0) returned "
                     f"{type(out).__name__}, neither the hidden state [batch, length, {width}] nor a tuple that starts "
                     f"with it, so tpsurgery cannot tell tuple_output; {fix}")
