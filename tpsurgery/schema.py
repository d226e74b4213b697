"""Building blocks of the recipe schema: numbers that refuse booleans, layer spans, and the ``edits`` section.

The ``edits`` section writes interventions directly as data (:mod:`tpsurgery.edits` explains sites and ops); the
``tp``, ``placeholder`` and ``attention`` sections are shorthands that compile to the same edits.

>>> spec = EditSpec.model_validate({"site": "attn_out_in", "layers": 5, "rows": "last", "op": "scale", "factor": 2})
>>> spec.layer_list(), spec.factor
([5], 2.0)
>>> EditSpec.model_validate({"site": "layer_in", "layers": {"start": 1, "stop": 3}, "op": "copy"}).layer_list()
[1, 2]
>>> from tpsurgery.recipe import parse_recipe
>>> parse_recipe({"prompt": "<PST> {text}", "edits": [{"site": "layer_in", "layers": 2, "op": "copy", "factor": 2}]})
Traceback (most recent call last):
...
tpsurgery.errors.RecipeError: recipe field `edits.0`: `factor` is not a parameter of op copy (its parameters: source, alpha)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _no_bool(value: Any) -> Any:
    # YAML reads `yes`/`true` as booleans and Python's bool is an int: never let one pass for a number.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


NUM = BeforeValidator(_no_bool)


def _seed_range(value: int) -> int:
    if not -(2**63) <= value <= 2**64 - 1:  # what torch.manual_seed accepts
        raise ValueError(f"a seed must fit in 64 bits (-2**63 .. 2**64 - 1), got {value}")
    return value


SEED = AfterValidator(_seed_range)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class Span(Frozen):
    """Half-open span ``[start, stop)`` of 0-based decoder-layer indices."""

    start: Annotated[int, Field(ge=0), NUM]
    stop: Annotated[int, Field(ge=1), NUM]

    @model_validator(mode="after")
    def _ordered(self) -> "Span":
        if self.stop <= self.start:
            raise ValueError(f"stop must be greater than start (got start={self.start}, stop={self.stop})")
        return self


_LAYER = Annotated[int, Field(ge=0), NUM]
_FINITE = Annotated[float, Field(allow_inf_nan=False), NUM]
# parameters each op takes besides site, layers, rows (and heads at attn_out_in)
OP_PARAMETERS: dict[str, tuple[str, ...]] = {
    "write": ("value", "seed", "mean", "std"),
    "copy": ("source", "alpha"),
    "add": ("run",),
    "subtract": ("run",),
    "scale": ("factor",),
    "recover_norm": ("eps",),
    "hide": (),
    "bidirectional": ("mode",),
}
_REQUIRED = {"write": "value", "add": "run", "subtract": "run", "scale": "factor", "bidirectional": "mode"}


class EditSpec(Frozen):
    """One entry of a recipe's ``edits`` list: ``op`` at ``site`` of each of ``layers``, on ``rows``.

    ``layers``: one layer, a list, or a span ``{start, stop}`` (0-based decoder layers; omitted for site ``embed``).
    ``rows``: ``placeholders`` (the ``<PST>`` tokens), ``last`` (the last token) or a negative position.
    Op parameters: ``write``: ``value`` (zeros, ones, uniform, gaussian with ``seed``/``mean``/``std``, or a list of
    floats); ``copy``: ``source`` (negative position, default -1) and ``alpha`` (weight of the source, default 1);
    ``add`` / ``subtract``: ``run`` (a name under the recipe's ``runs``); ``scale``: ``factor``; ``recover_norm``:
    ``eps`` (added to the new norm, default 0); ``bidirectional``: ``mode`` (last_token, sentence).
    ``heads``: at site ``attn_out_in`` only, the heads whose columns the op changes (default all).
    """

    site: Literal["embed", "attn_mask", "layer_in", "attn_out_in", "layer_out"]
    op: Literal["write", "copy", "add", "subtract", "scale", "recover_norm", "hide", "bidirectional"]
    layers: Union[_LAYER, tuple[_LAYER, ...], Span, None] = None
    rows: Union[Literal["placeholders", "last"], Annotated[int, Field(le=-1), NUM]] = "placeholders"
    heads: tuple[Annotated[int, Field(ge=0), NUM], ...] | None = None
    source: Annotated[int, Field(le=-1), NUM] = -1
    alpha: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False), NUM] = 1.0
    run: str | None = None
    factor: _FINITE | None = None
    eps: Annotated[float, Field(ge=0.0, allow_inf_nan=False), NUM] = 0.0
    value: Union[Literal["zeros", "ones", "uniform", "gaussian"], tuple[_FINITE, ...], None] = None
    seed: Annotated[int, NUM, SEED] = 0
    mean: _FINITE = 0.0
    std: Annotated[float, Field(gt=0.0, allow_inf_nan=False), NUM] = 1.0
    mode: Literal["last_token", "sentence"] | None = None

    @model_validator(mode="after")
    def _parameters(self) -> "EditSpec":
        allowed = OP_PARAMETERS[self.op]
        for name in sorted(self.model_fields_set - {"site", "op", "layers", "rows", "heads"}):
            if name not in allowed and getattr(self, name) != type(self).model_fields[name].default:
                its = f"its parameters: {', '.join(allowed)}" if allowed else "it takes no parameters"
                raise ValueError(f"`{name}` is not a parameter of op {self.op} ({its})")
        required = _REQUIRED.get(self.op)
        if required and getattr(self, required) is None:
            raise ValueError(f"op {self.op} needs `{required}`")
        if self.site == "embed" and self.layers is not None:
            raise ValueError("site embed (the embedding output) takes no `layers`")
        if self.site != "embed" and self.layers is None:
            raise ValueError(f"site {self.site} needs `layers` (a layer, a list, or {{start, stop}})")
        if isinstance(self.layers, tuple) and not self.layers:
            raise ValueError("`layers` is an empty list")
        if self.heads is not None and self.site != "attn_out_in":
            raise ValueError("`heads` applies to site attn_out_in only (the concatenated head outputs)")
        if self.op == "hide" and self.rows != "placeholders":
            raise ValueError("op hide applies to rows: placeholders only")
        return self

    def layer_list(self) -> list[int]:
        """The decoder layers, sorted (``[0]`` for the embedding output)."""
        if self.layers is None:
            return [0]
        if isinstance(self.layers, Span):
            return list(range(self.layers.start, self.layers.stop))
        if isinstance(self.layers, int):
            return [self.layers]
        return sorted(set(self.layers))
