"""Where a decoder keeps its layers, token embeddings and final norm: one small typed table.

Supporting a new decoder family is one call, not a code path:

>>> from tpsurgery.arch import ArchSpec, register_architecture, ARCHITECTURES
>>> register_architecture("my_decoder", ArchSpec("backbone.blocks", "backbone.embed", "backbone.norm_f"))
>>> ARCHITECTURES["my_decoder"].layers
'backbone.blocks'
>>> del ARCHITECTURES["my_decoder"]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted attribute paths, from the ``*ForCausalLM`` object, of the pieces tpsurgery touches.

    ``layers``: the ``ModuleList`` of decoder layers; ``embed``: the token-embedding module (its output rows are where
    placeholders get their initial vectors); ``norm``: the final norm whose output HF reports as the last
    ``hidden_states`` entry; ``tuple_output``: the decoder layer returns a tuple whose first item is the hidden state;
    ``attn_out``: path *from a decoder layer* to the attention output projection, whose input is the concatenated
    head outputs (edit site ``attn_out_in``; None: the family has none that tpsurgery knows).
    """

    layers: str
    embed: str
    norm: str
    tuple_output: bool = False
    attn_out: str | None = "self_attn.o_proj"


_LLAMA_LIKE = ArchSpec("model.layers", "model.embed_tokens", "model.norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2", "smollm3",
        )
    },
    "gpt2": ArchSpec("transformer.h", "transformer.wte", "transformer.ln_f", attn_out="attn.c_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm",
                         attn_out="attention.dense"),
    "opt": ArchSpec("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm",
                    attn_out="self_attn.out_proj"),
    "falcon": ArchSpec("transformer.h", "transformer.word_embeddings", "transformer.ln_f", tuple_output=True,
                       attn_out="self_attention.dense"),
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach tpsurgery a decoder family, keyed by ``config.model_type``."""
    if not isinstance(spec, ArchSpec):
        raise ModelError(f"register_architecture expects an ArchSpec, got {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


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
    """The ArchSpec of a transformers causal LM: by ``config.model_type``, else the first table row that fits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) if model_type else None
    if spec is not None and all(_has_path(model, p) for p in (spec.layers, spec.embed, spec.norm)):
        return spec
    for candidate in dict.fromkeys(ARCHITECTURES.values()):
        if all(_has_path(model, p) for p in (candidate.layers, candidate.embed, candidate.norm)):
            return candidate
    families = ", ".join(sorted(ARCHITECTURES))
    raise ModelError(
        f"cannot locate the decoder layers of {type(model).__name__} (model_type={model_type!r}). "
        f"Supported families: {families}. Register a new one with "
        "tpsurgery.register_architecture(model_type, ArchSpec(layers=..., embed=..., norm=...)), "
        "giving dotted paths from the causal-LM object."
    )
