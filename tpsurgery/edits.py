"""Edits as data: what a plan does to the model, as a flat list of ``Edit(site, layer, op, ...)`` values.

Every recipe compiles to one tuple of edits (:func:`tpsurgery.plan.compile_plan`); backends map each *site* to a hook
point through the architecture table and apply each *op* with one pure tensor function
(:mod:`tpsurgery.backends.surgery`). Token Prepending is three of them:

>>> tp = Edit("layer_in", 1, "copy", rows="placeholders", source=-1)
>>> print(describe_edit(tp))
layer input: placeholders <- position -1
>>> print(describe_edit(Edit("layer_in", 1, "copy", source=-1, field="tp")))    # from the tp shorthand
TP layer input: placeholders <- position -1
>>> Edit("attn_out_in", 5, "scale", rows="last", factor=2.0).runs_at
(5, 3)
>>> Edit("layer_in", 1, "frob")
Traceback (most recent call last):
...
tpsurgery.errors.RecipeError: recipe field `edits`: unknown op 'frob'; allowed: write, copy, add, subtract, scale, recover_norm, hide, bidirectional

Sites, in the order they run inside decoder layer ``i`` (``layer`` is 0 for ``embed``, which runs before layer 0):

* ``embed``: the token-embedding output (``hidden_states[0]`` is read after it);
* ``attn_mask``: the attention mask layer ``i`` receives (ops ``hide``, ``bidirectional``);
* ``layer_in``: the input of decoder layer ``i`` (``hidden_states[i]`` is read *before* it);
* ``attn_out_in``: the input of layer ``i``'s attention output projection (``o_proj``): the concatenated head outputs,
  ``heads`` selects head columns;
* ``layer_out``: the output of decoder layer ``i`` (``hidden_states[i + 1]`` is read *after* it).

Ops on rows (``rows``: ``placeholders``, ``last``, ``all``, ``sentence``, ``prompt``, a position — negative from the
end, 0 or more from the start — or a tuple of positions): ``write`` a vector, ``copy`` the row at ``source``
(``alpha`` < 1 mixes it with the row), ``add`` / ``subtract`` a fixed vector or the same rows of an auxiliary prompt's
run of the same sentence at the same site and layer (``run``), ``scale`` by ``factor``, ``recover_norm`` (rescale to
the norm the rows had before this site's first edit; ``eps`` is added to the new norm). Mask ops: ``hide`` (no other
token attends to the placeholders), ``bidirectional`` (``mode``). Each op is one entry of :data:`tpsurgery.ops.OPS`
(parameters, validation, description, tensor function).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Union

import torch

from .errors import RecipeError
from .ops import OPS

SITES = ("embed", "attn_mask", "layer_in", "attn_out_in", "layer_out")  # execution order within a layer
SITE_NAMES = {"embed": "embedding output", "attn_mask": "attention mask", "layer_in": "layer input",
              "attn_out_in": "o_proj input", "layer_out": "layer output"}
Rows = Union[str, int, tuple[int, ...]]


class Vector:
    """An immutable float32 vector that compares by value (a tensor inside a frozen, comparable :class:`Edit`).

    >>> Vector(torch.zeros(3)) == Vector(torch.zeros(3)), Vector(torch.zeros(3)) == Vector(torch.ones(3))
    (True, False)
    """

    __slots__ = ("tensor", "digest")

    def __init__(self, tensor: torch.Tensor):
        t = tensor.detach().to(torch.float32).clone()
        object.__setattr__(self, "tensor", t)
        object.__setattr__(self, "digest", hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16])

    def __setattr__(self, name, value):
        raise AttributeError("Vector is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and self.digest == other.digest and torch.equal(self.tensor, other.tensor)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Vector(d={self.tensor.numel()}, sha256={self.digest})"


@dataclass(frozen=True)
class Edit:
    """One intervention: ``op`` applied to ``rows`` at ``site`` of decoder layer ``layer`` (see the module doc).

    ``field`` names the recipe field the edit came from (error messages); it does not take part in comparisons.
    """

    site: str
    layer: int
    op: str
    rows: Rows = "placeholders"
    source: int | None = None
    alpha: float = 1.0
    factor: float = 1.0
    run: str | None = None
    heads: tuple[int, ...] | None = None
    vector: Vector | None = None
    eps: float = 0.0
    mode: str | None = None
    field: str = field(default="edits", compare=False)

    def __post_init__(self) -> None:
        # parameters are validated once, by the op's model (tpsurgery.ops), before an Edit is made
        if self.op not in OPS:
            raise RecipeError(self.field, f"unknown op {self.op!r}; allowed: {', '.join(OPS)}")
        if self.site not in OPS[self.op].sites or self.layer < 0:
            raise RecipeError(self.field, f"op {self.op} at site {self.site!r}, layer {self.layer}: it applies at "
                                          f"{', '.join(OPS[self.op].sites)}, layers >= 0")

    @property
    def runs_at(self) -> tuple[int, int]:
        """``(layer, site rank)``: edits run sorted by this key (:data:`SITES` order inside a layer)."""
        return self.layer, SITES.index(self.site)

    @property
    def reach(self) -> int:
        """The most negative position the edit touches (0: none); inputs shorter than ``-reach`` are rejected."""
        rows = self.rows if isinstance(self.rows, tuple) else (self.rows,)
        return min([p for p in (*rows, self.source) if isinstance(p, int)] + [0])


def describe_edit(e: Edit) -> str:
    """One line, e.g. ``layer input: placeholders <- position -1`` (the op's text from :data:`tpsurgery.ops.OPS`)."""
    rows = "position " + str(e.rows) if isinstance(e.rows, int) else \
        "positions " + ", ".join(map(str, e.rows)) if isinstance(e.rows, tuple) else e.rows
    if e.heads is not None:
        rows += f" (heads {', '.join(map(str, e.heads))})"
    origin = {"tp": "TP ", "placeholder.init": "placeholder init ", "placeholder.mask": "placeholder mask ",
              "attention.bidirectional": ""}.get(e.field, "")
    return f"{origin}{SITE_NAMES[e.site]}: {OPS[e.op].describe(e, rows)}"


def layer_ranges(layers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``'layers 1-3, 7'``.

    >>> layer_ranges([1, 2, 3, 7]), layer_ranges([4])
    ('layers 1-3, 7', 'layer 4')
    """
    parts, start = [], None
    for k, i in enumerate(layers):
        start = i if start is None else start
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            parts.append(str(i) if start == i else f"{start}-{i}")
            start = None
    return ("layers " if len(layers) > 1 else "layer ") + ", ".join(parts)
