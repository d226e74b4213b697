"""Building blocks of the recipe schema: numbers that refuse booleans, layer spans, row selectors, vector values,
the fields every edit has (:class:`EditBase`; each op's own model is in :mod:`tpsurgery.ops`) and the pooling.

The ``edits`` section writes interventions directly as data (:mod:`tpsurgery.edits` explains sites and ops); the
``tp``, ``placeholder`` and ``attention`` sections are shorthands that compile to the same edits.

>>> spec = EditBase.model_validate({"site": "attn_out_in", "layers": {"start": 1, "stop": 3}, "rows": {"start": -3, "stop": 0}})
>>> spec.layer_list(), spec.rows
([1, 2], (-3, -2, -1))
>>> PoolingSpec.model_validate({"tokens": "last_k", "k": 4, "layers": [-3, -2]}).layer_list()
[-3, -2]
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

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
ROW_NAMES = ("placeholders", "last", "all", "sentence", "prompt")
NAMED_VECTORS = ("zeros", "ones", "uniform", "gaussian")
VECTOR_FILES = (".npy", ".safetensors")


class Positions(Frozen):
    """A span of token positions ``[start, stop)``: both counted from the start (``0 <= start < stop``), or both from
    the end (``start < stop <= 0``; ``stop: 0`` is the end): ``{start: -3, stop: 0}`` = the last three tokens."""

    start: Annotated[int, NUM]
    stop: Annotated[int, NUM]

    @model_validator(mode="after")
    def _ordered(self) -> "Positions":
        if not (0 <= self.start < self.stop or self.start < self.stop <= 0):
            raise ValueError(f"give 0 <= start < stop (from the start) or start < stop <= 0 (from the end); got "
                             f"start={self.start}, stop={self.stop}")
        return self


def _positions(value: Any) -> Any:
    """A ``{start, stop}`` position span becomes the list of its positions (a list keeps its order, no repeats)."""
    if isinstance(value, dict) and set(value) <= {"start", "stop"}:
        span = Positions.model_validate(value)
        return list(range(span.start, span.stop))
    if isinstance(value, (list, tuple)) and len(set(value)) != len(value):
        raise ValueError(f"positions {list(value)} repeat")
    return value


ROW_SELECTOR = Annotated[Union[Literal["placeholders", "last", "all", "sentence", "prompt"], Annotated[int, NUM],
                       Annotated[tuple[Annotated[int, NUM], ...], Field(min_length=1)]], BeforeValidator(_positions)]


class VectorFile(Frozen):
    """A vector stored in a ``.npy`` / ``.safetensors`` file (one 1-D array), by absolute path and content hash."""

    path: str
    sha256: str


def _vector_file(value: Any, info: Any) -> Any:
    """A ``.npy`` / ``.safetensors`` path (relative: to the recipe file's folder, ``context["base"]``) becomes a
    :class:`VectorFile` with the file's content hash."""
    if isinstance(value, str) and value.endswith(VECTOR_FILES):
        import hashlib
        from pathlib import Path

        base = (info.context or {}).get("base") if info is not None else None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path(base or ".") / path
        try:
            data = path.resolve().read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the vector file {str(path)!r}: {exc.strerror or exc}") from None
        return {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    return value


VALUE = Annotated[Union[Literal["zeros", "ones", "uniform", "gaussian"], tuple[_FINITE, ...], VectorFile],
                  BeforeValidator(_vector_file)]
HEADS = tuple[Annotated[int, Field(ge=0), NUM], ...]


class EditBase(Frozen):
    """What every entry of ``edits`` has: ``op`` at ``site`` of each of ``layers``, on ``rows`` (``heads``: at site
    ``attn_out_in`` only, the heads whose columns the op changes). Each op's model (:mod:`tpsurgery.ops`) adds its own
    parameters and their bounds.

    ``layers``: one layer, a list, or a span ``{start, stop}`` (0-based decoder layers; omitted for site ``embed``).
    ``rows``: ``placeholders`` (the ``<PST>`` tokens), ``last`` (the last token), ``all`` (every token, the prompt
    included), ``sentence`` (the last ``{text}`` slot's tokens), ``prompt`` (every token that is neither a sentence
    token nor a placeholder), a position (negative: from the end, -1 = last token; 0 or more: from the start), a list
    of positions, or a span of positions ``{start, stop}`` (:class:`Positions`).
    """

    SITES: ClassVar[tuple[str, ...]] = ()  # the sites the op applies at (set by each op's model)
    ROWS: ClassVar[tuple[str, ...] | None] = None  # the row selectors it accepts (None: any)

    site: Literal["embed", "attn_mask", "layer_in", "attn_out_in", "layer_out"]
    layers: Union[_LAYER, tuple[_LAYER, ...], Span, None] = None
    rows: ROW_SELECTOR = "placeholders"
    heads: HEADS | None = None

    @model_validator(mode="after")
    def _where(self) -> "EditBase":
        op = getattr(self, "op", None)
        if self.SITES and self.site not in self.SITES:
            raise ValueError(f"op {op!r} does not apply at site {self.site!r} (it applies at: {', '.join(self.SITES)})")
        if self.ROWS is not None and self.rows not in self.ROWS:
            raise ValueError(f"op {op} applies to rows: {', '.join(self.ROWS)} only")
        if self.site == "embed" and self.layers is not None:
            raise ValueError("site embed (the embedding output) takes no `layers`")
        if self.site != "embed" and self.layers is None:
            raise ValueError(f"site {self.site} needs `layers` (a layer, a list, or {{start, stop}})")
        if isinstance(self.layers, tuple) and not self.layers:
            raise ValueError("`layers` is an empty list")
        if self.heads is not None and self.site != "attn_out_in":
            raise ValueError("`heads` applies to site attn_out_in only (the concatenated head outputs)")
        if self.heads is not None and not self.heads:
            raise ValueError("`heads` is an empty list")
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


class VectorParams(Frozen):
    """``value``: a named vector (``zeros``, ``ones``, ``uniform`` U[0, 1), ``gaussian`` N(``mean``, ``std``) from
    ``seed``), a list of floats, or a ``.npy`` / ``.safetensors`` file (path relative to the recipe file)."""

    value: VALUE | None = None
    seed: Annotated[int, NUM, SEED] = 0
    mean: _FINITE = 0.0
    std: Annotated[float, Field(gt=0.0, allow_inf_nan=False), NUM] = 1.0


HIDDEN_LAYER = Annotated[int, NUM]


class PoolingSpec(Frozen):
    """How the embedding is read: ``tokens`` (``last``; ``mean`` over the sentence; ``last_k``: mean of the last ``k``
    tokens) of each ``hidden_states`` index in ``layers`` (an index, a list, or a span ``{start, stop}``; negative
    indices count from the end like ``exit_layer``; default: ``exit_layer``), combined by their mean or, with
    ``weights`` (one per layer), their weighted sum."""

    tokens: Literal["last", "mean", "last_k"] = "last"
    k: Annotated[int, Field(ge=1), NUM] | None = None
    layers: Union[HIDDEN_LAYER, tuple[HIDDEN_LAYER, ...], Span, None] = None
    weights: tuple[_FINITE, ...] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "PoolingSpec":
        if (self.tokens == "last_k") != (self.k is not None):
            raise ValueError("`k` goes with tokens: last_k (and last_k needs it)")
        if isinstance(self.layers, tuple) and not self.layers:
            raise ValueError("`layers` is an empty list")
        n = len(self.layer_list()) if self.layers is not None else 1
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"{len(self.weights)} weights for {n} layers")
        return self

    def layer_list(self) -> list[int] | None:
        """The ``hidden_states`` indices as written (None: the exit layer)."""
        if self.layers is None:
            return None
        if isinstance(self.layers, Span):
            return list(range(self.layers.start, self.layers.stop))
        return [self.layers] if isinstance(self.layers, int) else list(self.layers)
