"""Edits that cannot act: found from the recipe and the model's structure before anything is encoded.

An edit is *inert* when the model (or the recipe itself) removes its effect, so every value of its parameter gives
the same embedding and a grid over it is wasted. Found here, from the compiled plan and the module tree (never
numerically: on tiny random models a norm's epsilon dominates the small activations and hides the cancellation):

* **a scale before a scale-invariant norm.** ``scale`` at ``attn_out_in`` (the ``o_proj`` input) of a
  layer whose attention output is normalised before the residual add (Gemma2 / Gemma3 / OLMo2:
  ``post_attention_layernorm``; :data:`ATTN_OUTPUT_NORM`) is cancelled when (1) it scales whole rows, i.e. every
  head (``heads`` omitted or listing all of them), (2) the factor is not 0 (0 zeroes the row; a negative factor
  flips its sign, which acts, but its size does not: flagged as "only its sign can act"), (3) ``o_proj`` has no bias (``W (c x) + b`` is not ``c (W x + b)``) and (4) every later edit
  at the same site of that layer is itself a ``scale`` or a ``recover_norm`` (they keep ``c`` a global factor; an
  ``add``/``subtract``/``copy``/``write`` after the scale mixes in something ``c`` did not multiply). o_proj acts
  on each position on its own and the norm normalises each position's whole vector, so which rows are scaled does
  not matter; a *subset of heads* is not cancelled (the other heads' columns keep their size, so the direction of
  ``W x`` changes). ``scale`` at ``layer_out`` of the last decoder layer when the read is ``hidden_states[n]`` (the
  final norm's output) is cancelled by the final norm the same way. Llama-like layers add the attention output to
  the residual stream unnormalised: a factor there always acts and is never flagged.
* **a scale that a ``recover_norm`` at the same site undoes**: ``recover_norm`` rescales the rows to the norm they had
  before the site's first edit, so the size of a whole-row ``scale`` followed only by scales up to it cannot matter.
* **no-ops**: ``scale`` by 1, ``copy`` with ``alpha`` 0, ``recover_norm`` as the first edit at its site.
* **edits at or after the exit** (``layers >= M`` for ``hidden_states[M]``): the plan already drops them with a
  warning; :func:`inert_edits` lists them too, so ``explain`` shows them.

>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> cp = {"prompt": "This : {text} means", "exit_layer": 3, "runs": {"aux": "Nothing : {text} means"},
...       "edits": [{"site": "attn_out_in", "layers": 1, "rows": "last", "op": "subtract", "run": "aux"},
...                 {"site": "attn_out_in", "layers": 1, "rows": "last", "op": "scale", "factor": 2.0}]}
>>> def embedder(arch):
...     model, tok = tiny_model(arch)
...     return tpsurgery.apply(model, cp, tokenizer=tok)
>>> [str(i) for i in inert_edits(embedder("gemma2"))]
['edits.1 (layer 1): attn_out_in scale by 2.0 is cancelled by model.layers.1.post_attention_layernorm (the attention output is normalised before the residual add, so the size of a factor on every head of a row cannot change it)']
>>> inert_edits(embedder("llama"))
[]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from .arch import ARCHITECTURES, arch_for, get_path

# model_type -> path, from a decoder layer, of the norm applied to the attention output before the residual add
ATTN_OUTPUT_NORM: dict[str, str] = {
    "gemma2": "post_attention_layernorm",
    "gemma3": "post_attention_layernorm",
    "gemma3_text": "post_attention_layernorm",
    "olmo2": "post_attention_layernorm",
}
_HOMOGENEOUS = ("scale", "recover_norm")  # ops g with g(c x) = c g(x) or g(c x) = g(x) for c > 0


class InertEditWarning(UserWarning):
    """An edit whose effect the model (or the recipe) removes: every value of its parameter gives the same read."""


@dataclass(frozen=True)
class Inert:
    """One inert edit: the recipe ``field`` and ``layer``, what it does, and the module (or edit) that cancels it."""

    field: str
    layer: int
    what: str
    by: str
    why: str

    def __str__(self) -> str:
        return f"{self.field} (layer {self.layer}): {self.what} is cancelled by {self.by} ({self.why})"


def attn_output_norm(model: Any) -> str | None:
    """The attention-output norm's path from a decoder layer (:data:`ATTN_OUTPUT_NORM`), or None.

    Decided by ``config.model_type``; a model of an unlisted type whose layers have both ``pre_feedforward_layernorm``
    and ``post_attention_layernorm`` (the Gemma2 sandwich) counts too.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    spec = arch_for(model)
    layer0 = get_path(model, spec.layers)[0]
    path = ATTN_OUTPUT_NORM.get(mt)
    if path is None and mt not in ARCHITECTURES:
        path = "post_attention_layernorm" if all(hasattr(layer0, p) for p in
                                                 ("pre_feedforward_layernorm", "post_attention_layernorm")) else None
    return path if path and hasattr(layer0, path) else None


def _all_heads(e: Any, n_heads: int | None) -> bool:
    return e.heads is None or (n_heads is not None and set(e.heads) >= set(range(n_heads)))


def _later_homogeneous(edits: Sequence[Any], k: int) -> bool:
    e = edits[k]
    return all(x.op in _HOMOGENEOUS for x in edits[k + 1:] if x.site == e.site and x.layer == e.layer)


def _recover_after(edits: Sequence[Any], k: int) -> bool:
    """A ``recover_norm`` on the same rows follows at the same site, with only scales between."""
    e = edits[k]
    for x in edits[k + 1:]:
        if x.site != e.site or x.layer != e.layer:
            continue
        if x.op == "recover_norm":
            return x.rows == e.rows and x.heads is None
        if x.op != "scale":
            return False
    return False


def _first_at_site(edits: Sequence[Any], k: int) -> bool:
    e = edits[k]
    return not any(x.site == e.site and x.layer == e.layer and x.rows == e.rows for x in edits[:k])


def inert_edits(embedder: Any) -> list[Inert]:
    """Every inert edit of an :class:`~tpsurgery.Embedder`'s plan and recipe (see the module docstring)."""
    model, plan, recipe = embedder.model, embedder.plan, embedder.recipe
    spec = arch_for(model)
    layers_path = spec.layers
    norm = attn_output_norm(model)
    edits = list(plan.edits)
    out: list[Inert] = []
    for k, e in enumerate(edits):
        where = f"{e.site} {e.op}" + (f" by {e.factor}" if e.op == "scale" else "")
        if e.op == "scale" and e.factor == 1.0 or e.op == "copy" and e.alpha == 0.0:
            out.append(Inert(e.field, e.layer, where, "its own parameter", "a no-op"))
            continue
        if e.op == "recover_norm" and _first_at_site(edits, k):
            out.append(Inert(e.field, e.layer, where, "itself", "no edit before it at this site: the rows already "
                             "have the norm it restores"))
            continue
        if e.op != "scale" or e.factor == 0 or not _all_heads(e, plan.n_heads):
            continue
        if e.factor < 0:
            where += " (only its sign can act: the same read as factor -1)"
        if _recover_after(edits, k):
            out.append(Inert(e.field, e.layer, where, "the recover_norm after it at the same site",
                             "it restores the norm the rows had before this site's edits"))
        elif not _later_homogeneous(edits, k):
            continue
        elif e.site == "attn_out_in" and norm is not None:
            o_proj = get_path(get_path(model, layers_path)[e.layer], spec.attn_out)
            if getattr(o_proj, "bias", None) is None:
                out.append(Inert(e.field, e.layer, where, f"{layers_path}.{e.layer}.{norm}",
                                 "the attention output is normalised before the residual add, so the size of a factor "
                                 "on every head of a row cannot change it"))
        elif e.site == "layer_out" and e.layer == plan.n_layers - 1 and plan.exit_layer == plan.n_layers:
            out.append(Inert(e.field, e.layer, where, spec.norm, "the read hidden_states[-1] is the final norm's "
                             "output, which the size of a factor on a whole row cannot change"))
    m = plan.exit_layer
    for k, s in enumerate(getattr(recipe, "edits", ()) or ()):
        for i in s.layer_list():
            if s.site != "embed" and i >= m:
                out.append(Inert(f"edits.{k}", i, f"{s.site} {s.op}", f"the exit (hidden_states[{m}])",
                                 "edits of layers >= the exit layer cannot change the read; dropped"))
    return out


def warn_inert(embedder: Any, stacklevel: int = 3) -> list[Inert]:
    """One :class:`InertEditWarning` listing the inert edits (those the plan kept; the exit cut warns on its own)."""
    found = inert_edits(embedder)
    kept = [i for i in found if not i.by.startswith("the exit")]
    if kept:
        warnings.warn("edits that cannot act: " + "; ".join(map(str, kept)), InertEditWarning, stacklevel=stacklevel)
    return found


def describe_inert(found: Sequence[Inert]) -> str:
    """The ``explain`` section: one line per inert edit, or a line saying there is none."""
    if not found:
        return "inert edits: none (every edit can change the read)"
    return "inert edits (their parameters cannot change the read):\n" + "\n".join(f"  {i}" for i in found)
