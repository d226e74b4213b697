"""The edit ops, one registry entry each: its parameters (a pydantic model, so each op owns its bounds and the sites
and rows it applies at), its ``describe`` text, its tensor function, and example parameters (the property tests draw ops and their
parameters from :data:`OPS`, so a new op is tested the day it lands).

>>> sorted(OPS)
['add', 'bidirectional', 'copy', 'hide', 'recover_norm', 'scale', 'subtract', 'write']
>>> spec = validate_edit({"site": "attn_out_in", "layers": 5, "rows": "last", "op": "scale", "factor": 2})
>>> type(spec).__name__, spec.layer_list(), spec.factor
('Scale', [5], 2.0)
>>> from tpsurgery.recipe import parse_recipe
>>> parse_recipe({"prompt": "<PST> {text}", "edits": [{"site": "layer_in", "layers": 2, "op": "copy", "factor": 2}]})
Traceback (most recent call last):
...
tpsurgery.errors.RecipeError: recipe field `edits.0.factor`: not a parameter of op copy (its parameters: source, alpha; every edit: site, layers, rows, heads)

A row op's tensor function ``fn(e, x, ctx)`` gets the site's tensor split into head groups, ``x``:
``Float[Tensor, "b l h d"]`` (``h`` = the model's heads when the edit names ``heads``, else one group of the whole
width), and returns the new tensor of that shape; the caller keeps it only on the edit's rows and heads
(:func:`tpsurgery.backends.surgery.apply_edits`). ``ctx`` (:class:`OpContext`) gives the operands: the tensor before
this site's first edit, a row of ``x``, the edit's vector, an auxiliary run's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal, Protocol, Union, runtime_checkable

import torch
from jaxtyping import Bool, Float
from pydantic import Field, TypeAdapter, model_validator
from torch import Tensor

from .schema import NUM, EditBase, VectorParams

ROW_SITES = ("embed", "layer_in", "attn_out_in", "layer_out")
MASK_SITES = ("attn_mask",)
_NEG = Annotated[int, Field(le=-1), NUM]


@runtime_checkable
class OpContext(Protocol):
    """What a row op's tensor function may read besides ``x`` (built by the backends' surgery)."""

    orig: Float[Tensor, "b l h d"]  # the site's tensor before its first edit
    heads: Bool[Tensor, "h"]  # the edited head groups

    def row(self, position: int) -> Float[Tensor, "b 1 h d"]: ...  # a row of the current tensor

    def vector(self) -> Float[Tensor, "h d"]: ...  # the edit's vector, split like x

    def other(self) -> Float[Tensor, "b l h d"]: ...  # an auxiliary run's rows, placed on the edit's rows

    def norm(self, t: Float[Tensor, "b l h d"]) -> Float[Tensor, "b l 1 1"]: ...  # over the edited heads


@dataclass(frozen=True)
class Op:
    """One op: ``spec`` (its recipe model), ``sites``, ``describe(e, rows_text)``, ``fn`` (row ops; mask ops are
    built by :mod:`tpsurgery.masks`: None), ``examples`` (parameter sets the property tests draw from)."""

    name: str
    spec: type[EditBase]
    describe: Callable[[Any, str], str]
    fn: Callable[[Any, Tensor, OpContext], Tensor] | None
    examples: tuple[dict, ...]

    @property
    def sites(self) -> tuple[str, ...]:
        return self.spec.SITES

    @property
    def rows(self) -> tuple[str, ...] | None:
        """The row selectors it accepts (None: any)."""
        return self.spec.ROWS

    @property
    def parameters(self) -> tuple[str, ...]:
        """Its own parameters (besides site, layers, rows, heads)."""
        return tuple(n for n in self.spec.model_fields if n not in EditBase.model_fields and n != "op")


# ------------------------------------------------------------------------------------------------ parameter models
class Write(EditBase, VectorParams):
    op: Literal["write"]
    SITES: ClassVar = ROW_SITES

    @model_validator(mode="after")
    def _needs_value(self) -> "Write":
        if self.value is None:
            raise ValueError("op write needs `value` (zeros, ones, uniform, gaussian, a list of floats, or a .npy / "
                             ".safetensors file)")
        return self


class Copy(EditBase):
    op: Literal["copy"]
    SITES: ClassVar = ROW_SITES
    source: _NEG = -1
    alpha: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False), NUM] = 1.0


class _Shift(EditBase, VectorParams):
    SITES: ClassVar = ROW_SITES
    run: str | None = None

    @model_validator(mode="after")
    def _one_operand(self) -> "_Shift":
        if (self.run is None) == (self.value is None):
            raise ValueError(f"op {self.op} needs exactly one of `run` (an auxiliary prompt's rows) and `value` (a "
                             "fixed vector: named, a list of floats, or a .npy / .safetensors file)")
        return self


class Add(_Shift):
    op: Literal["add"]


class Subtract(_Shift):
    op: Literal["subtract"]


class Scale(EditBase):
    op: Literal["scale"]
    SITES: ClassVar = ROW_SITES
    factor: Annotated[float, Field(allow_inf_nan=False), NUM]


class RecoverNorm(EditBase):
    op: Literal["recover_norm"]
    SITES: ClassVar = ROW_SITES
    eps: Annotated[float, Field(ge=0.0, allow_inf_nan=False), NUM] = 0.0


class Hide(EditBase):
    op: Literal["hide"]
    SITES: ClassVar = MASK_SITES
    ROWS: ClassVar = ("placeholders",)


class Bidirectional(EditBase):
    op: Literal["bidirectional"]
    SITES: ClassVar = MASK_SITES
    ROWS: ClassVar = ("placeholders",)
    mode: Literal["last_token", "sentence"]


# ------------------------------------------------------------------------------------------------ tensor functions
def _write(e: Any, x: Float[Tensor, "b l h d"], ctx: OpContext) -> Float[Tensor, "b l h d"]:
    return ctx.vector().to(x.dtype).expand_as(x)


def _copy(e: Any, x: Float[Tensor, "b l h d"], ctx: OpContext) -> Float[Tensor, "b l h d"]:
    src = ctx.row(e.source)
    if e.alpha != 1.0:
        src = e.alpha * src + (1.0 - e.alpha) * x
    return src.expand_as(x).to(x.dtype)


def _operand(e: Any, x: Tensor, ctx: OpContext) -> Tensor:
    return ctx.other() if e.run is not None else ctx.vector().to(x.dtype)


def _add(e: Any, x: Float[Tensor, "b l h d"], ctx: OpContext) -> Float[Tensor, "b l h d"]:
    return x + _operand(e, x, ctx)


def _subtract(e: Any, x: Float[Tensor, "b l h d"], ctx: OpContext) -> Float[Tensor, "b l h d"]:
    return x - _operand(e, x, ctx)


def _scale(e: Any, x: Float[Tensor, "b l h d"], ctx: OpContext) -> Float[Tensor, "b l h d"]:
    return x * e.factor


def _recover_norm(e: Any, x: Float[Tensor, "b l h d"], ctx: OpContext) -> Float[Tensor, "b l h d"]:
    return x * (ctx.norm(ctx.orig) / (ctx.norm(x) + e.eps))


def _shift_text(sign: str) -> Callable[[Any, str], str]:
    def text(e: Any, rows: str) -> str:
        return f"{rows} {sign}= " + (f"run {e.run!r}" if e.run is not None else f"vector {e.vector.digest[:8]}")
    return text


OPS: dict[str, Op] = {op.name: op for op in (
    Op("write", Write, lambda e, rows: f"{rows} <- vector {e.vector.digest[:8]}", _write,
       ({"value": "zeros"}, {"value": "ones"}, {"value": "uniform", "seed": 3}, {"value": "gaussian", "seed": 7})),
    Op("copy", Copy,
       lambda e, rows: f"{rows} <- position {e.source}" + (f" (alpha={e.alpha})" if e.alpha != 1.0 else ""), _copy,
       ({}, {"alpha": 0.5}, {"source": -2, "alpha": 0.25})),
    Op("add", Add, _shift_text("+"), _add,
       ({"run": "aux"}, {"value": "ones"}, {"value": "gaussian", "seed": 1, "std": 0.5})),
    Op("subtract", Subtract, _shift_text("-"), _subtract, ({"run": "aux"}, {"value": "uniform", "seed": 2})),
    Op("scale", Scale, lambda e, rows: f"{rows} *= {e.factor}", _scale,
       ({"factor": 2.0}, {"factor": 0.0}, {"factor": -1.0}, {"factor": 0.5})),
    Op("recover_norm", RecoverNorm,
       lambda e, rows: f"{rows}: norm back to its value before this site's edits", _recover_norm,
       ({}, {"eps": 1e-7})),
    Op("hide", Hide, lambda e, rows: f"no other token attends to the {rows}", None, ({},)),
    Op("bidirectional", Bidirectional, lambda e, rows: f"bidirectional={e.mode}", None,
       ({"mode": "last_token"}, {"mode": "sentence"})),
)}
ROW_OPS = tuple(n for n, op in OPS.items() if op.fn is not None)
MASK_OPS = tuple(n for n, op in OPS.items() if op.fn is None)


EditSpec = Annotated[Union[tuple(op.spec for op in OPS.values())], Field(discriminator="op")]
EditSpec.__doc__ = "One entry of a recipe's ``edits`` list: the op's model, chosen by ``op``."
_ADAPTER = TypeAdapter(EditSpec)


def validate_edit(data: Any, context: dict | None = None) -> EditBase:
    """An edit entry validated by its op's model (pydantic's ValidationError on failure)."""
    return _ADAPTER.validate_python(data, context=context)
