"""Plans: a recipe compiled against a model's depth (a tuple of edits, the reads, and the facts prefix reuse and
batching read); plain data read by fixed backend code, with the tokenized batch (:mod:`tpsurgery.batch`).

>>> from tpsurgery.recipe import parse_recipe
>>> plan = compile_plan(parse_recipe("prompt: '<PST> {text}'\\ntp: {start: 1, stop: 3}\\nexit_layer: -2"), n_layers=4, hidden_size=8)
>>> plan.exit_layer, plan.read_layers, plan.layers_run, plan.reach, plan.touches
(3, (3,), 3, -1, ('last', 'placeholders'))
>>> plan.edits[0]
Edit(site='layer_in', layer=1, op='copy', rows='placeholders', source=-1, alpha=1.0, factor=1.0, run=None, heads=None, vector=None, eps=0.0, mode=None, field='tp')
>>> print(plan.describe())
layers 1-2: TP layer input: placeholders <- position -1
layer 0: plain
read hidden_states[3] (output of decoder layer 2); layers 3.. and the LM head never run
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

from .edits import Edit, Rows, Vector, describe_edit, layer_ranges
from .errors import RecipeError
from .ops import OPS
from .prompts import Encoded
from .recipe import Recipe
from .schema import PoolingSpec
from .vectors import edit_vector, initial_vector


def row_positions(rows: Rows, row: Encoded) -> list[int]:
    """The positions of an unpadded encoded ``row`` that a row selector names.

    >>> r = Encoded(ids=(1, 0, 5, 6, 7), placeholders=(1,), text_span=(2, 4))
    >>> [row_positions(s, r) for s in ("placeholders", "last", "all", "sentence", "prompt", -2, 0, (0, -1))]
    [[1], [4], [0, 1, 2, 3, 4], [2, 3], [0, 4], [3], [0], [0, 4]]
    """
    n = len(row.ids)
    if rows == "placeholders":
        return list(row.placeholders)
    if rows == "last":
        return [n - 1]
    if rows == "all":
        return list(range(n))
    if rows == "sentence":
        return list(range(*row.text_span))
    if rows == "prompt":
        inside = set(range(*row.text_span)) | set(row.placeholders)
        return [p for p in range(n) if p not in inside]
    return [p if p >= 0 else n + p for p in (rows if isinstance(rows, tuple) else (rows,))]


@dataclass(frozen=True)
class Plan:
    """What the backend does for one recipe on one model: a sorted tuple of :class:`~tpsurgery.edits.Edit` values,
    then reads of ``hidden_states[j]`` for ``j`` in ``read_layers``, each pooled over tokens by ``pooling``, combined
    (mean, or the weighted sum with ``read_weights``) into the embedding.

    ``exit_layer`` is the resolved HF ``hidden_states`` index M in ``[0, n_layers]``, the deepest read (edits at
    layers >= M are dropped: they cannot change the read); ``runs`` the auxiliary prompts ``(name, template)`` whose
    runs ``add`` / ``subtract`` edits read; ``hide_placeholders``: placeholders get attention mask 0 in the batch
    (invisible in every layer, no position id); ``n_heads``: attention heads (for edits on head columns).

    Token pooling ``pooling``: ``last`` (the last token), ``mean`` (mean over the sentence tokens), ``last_k`` (mean of
    the last ``pool_k`` tokens).

    Facts the batching, prompt-prefix reuse and sweep sharing read (and nothing else of the edits):

    * :attr:`reach`: the most negative position (counted from the end) any edit or the pooling reads or writes;
      :attr:`min_length`: the fewest tokens an input must have (collation rejects shorter ones);
    * :attr:`touches`: which rows edits and the read touch (row selectors, canonical and hashable);
      :meth:`first_touched`: the first position of an encoded row that any of them touches;
    * :attr:`prefix_reusable` and :meth:`prefix_limit`: whether, and for how many leading tokens of a row, keys and
      values may come from a cache of the prompt prefix computed once without edits.
    """

    n_layers: int
    exit_layer: int
    edits: tuple[Edit, ...]
    pooling: str
    placeholder_id: int
    hide_placeholders: bool = False
    runs: tuple[tuple[str, str], ...] = ()
    n_heads: int | None = None
    reach: int = -1
    pool_k: int = 1
    read_layers: tuple[int, ...] = ()
    read_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.read_layers:
            object.__setattr__(self, "read_layers", (self.exit_layer,))

    @property
    def layers_run(self) -> int:
        """How many decoder layers run (the rest, the final norm unless M == n_layers, and the LM head never do)."""
        return min(self.exit_layer, self.n_layers)

    def at(self, site: str, layer: int | None = None) -> tuple[Edit, ...]:
        """The edits at ``site`` (of ``layer``), in the order they apply."""
        return tuple(e for e in self.edits if e.site == site and (layer is None or e.layer == layer))

    def by_layer(self) -> dict[int, dict[str, tuple[Edit, ...]]]:
        """``{layer: {site: edits}}`` (the embedding output's edits under layer 0, site ``embed``)."""
        out: dict[int, dict[str, tuple[Edit, ...]]] = {}
        for e in self.edits:
            sites = out.setdefault(e.layer, {})
            sites[e.site] = sites.get(e.site, ()) + (e,)
        return out

    @property
    def needs_masks(self) -> bool:
        return bool(self.at("attn_mask"))

    def captures(self, run: str) -> tuple[tuple[str, int, Rows], ...]:
        """``(site, layer, rows)`` that auxiliary run ``run`` must provide, in execution order."""
        keys = {(e.runs_at, e.site, e.layer, e.rows) for e in self.edits if e.run == run}
        return tuple((site, layer, rows) for _, site, layer, rows in sorted(keys, key=lambda k: (k[0], str(k[3]))))

    # -- facts for batching, prefix reuse and sharing ----------------------------------------------------------------
    @property
    def touches(self) -> tuple[Rows, ...]:
        """The row selectors that edits (``attn_mask`` edits: ``placeholders``; a ``copy``: its source position too),
        hidden placeholders and the token pooling (``sentence``, ``last`` or the last ``pool_k`` positions) touch,
        sorted and without repeats."""
        rows: set = {e.rows if e.site != "attn_mask" else "placeholders" for e in self.edits}
        rows |= {"last" if e.source == -1 else e.source for e in self.edits if e.source is not None}
        rows |= {"placeholders"} if self.hide_placeholders else set()
        rows |= {"sentence"} if self.pooling == "mean" else {tuple(range(-self.pool_k, 0))} \
            if self.pooling == "last_k" else {"last"}
        return tuple(sorted(rows, key=repr))

    def first_touched(self, row: Encoded) -> int:
        """The first position of ``row`` that an edit or the read touches (``len(row.ids)``: none)."""
        n = len(row.ids)
        return min([n] + [p for rows in self.touches for p in row_positions(rows, row)])

    @property
    def prefix_reusable(self) -> bool:
        """Whether keys/values of an unedited prompt prefix may be reused at all: not with attention-mask edits, which
        replace whole masks, nor with positions counted from the start (the rest of a cut row would count them from
        the cut)."""
        from_start = any(isinstance(p, int) and p >= 0 for rows in self.touches
                         for p in (rows if isinstance(rows, tuple) else (rows,)))
        return not (self.needs_masks or from_start)

    def prefix_limit(self, row: Encoded) -> int:
        """How many leading tokens of ``row`` may come from a prompt-prefix cache: none touched by an edit or the
        read, all before the sentence and the first placeholder, at least :attr:`min_length` tokens left (collation
        checks the rest of the row; 0: no reuse)."""
        if not self.prefix_reusable:
            return 0
        n = len(row.ids)
        return max(0, min([self.first_touched(row), row.text_span[0], n - self.min_length, *row.placeholders[:1]]))

    @property
    def min_length(self) -> int:
        """The fewest tokens an input needs: ``-reach`` and one past the largest position counted from the start."""
        front = [p for rows in self.touches for p in (rows if isinstance(rows, tuple) else (rows,))
                 if isinstance(p, int) and p >= 0]
        front += [e.source for e in self.edits if isinstance(e.source, int) and e.source >= 0]
        return max([1, -self.reach] + [p + 1 for p in front])

    def describe(self) -> str:
        """Layer ranges with what happens in them, then the read."""
        by_layer = self.by_layer()
        lines = [f"embedding output: {describe_edit(e).split(': ', 1)[1]}" for e in by_layer.get(0, {}).get("embed", ())]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in range(self.layers_run):
            acts = tuple(describe_edit(e) for site, edits in by_layer.get(i, {}).items() if site != "embed"
                         for e in edits)
            groups.setdefault(acts, []).append(i)
        for acts, layers in sorted(groups.items(), key=lambda g: g[1][0]):
            if acts:
                lines.append(f"{layer_ranges(layers)}: {'; '.join(acts)}")
        plain = groups.get((), [])
        if plain:
            lines.append(f"{layer_ranges(plain)}: plain")
        for name, template in self.runs:
            last = max(e.layer for e in self.edits if e.run == name)
            lines.append(f"run {name!r}: {template!r}, decoder layers 0..{last} (stops there)")
        m = self.exit_layer
        where = ("embedding output" if m == 0 else "final-norm output" if m == self.n_layers
                 else f"output of decoder layer {m - 1}")
        tail = "the LM head never runs" if m == self.n_layers else f"layers {m}.. and the LM head never run"
        lines.append(f"read hidden_states[{m}] ({where}); {tail}")
        if len(self.read_layers) > 1:
            how = f"weights {list(self.read_weights)}" if self.read_weights else "mean"
            lines.append(f"embedding: {how} of the reads of hidden_states{list(self.read_layers)}")
        return "\n".join(lines)


def resolve_exit_layer(exit_layer: int, n_layers: int) -> int:
    """HF ``hidden_states`` index: ``-1`` -> ``n_layers`` (final norm), ``-k`` -> ``n_layers + 1 - k``."""
    m = exit_layer + n_layers + 1 if exit_layer < 0 else exit_layer
    if not 0 <= m <= n_layers:
        raise RecipeError(
            "exit_layer",
            f"{exit_layer} is out of range for a model with {n_layers} decoder layers "
            f"(allowed: 0..{n_layers} or -{n_layers + 1}..-1; 0 = embedding output, {n_layers} = final-norm output)",
        )
    return m


def _span_layers(span, n_layers: int, field: str) -> range:
    if span.stop > n_layers:
        raise RecipeError(field, f"span [{span.start}, {span.stop}) exceeds the model's {n_layers} decoder layers "
                                 f"(allowed: 0 <= start < stop <= {n_layers}; decoder layers are numbered 0..{n_layers - 1})")
    return range(span.start, span.stop)


def check_depth(recipe: Recipe, n_layers: int, exit_layer: int | str | None = None,
                n_heads: int | None = None) -> None:
    """Every layer (and head) number of ``recipe`` that a model with ``n_layers`` decoder layers (``n_heads``
    attention heads) lacks, in one RecipeError (``exit_layer`` overrides the recipe's).

    >>> from tpsurgery.recipe import parse_recipe
    >>> check_depth(parse_recipe("prompt: '<PST> {text}'\\ntp: {start: 1, stop: 40}\\nexit_layer: 31"), 30)
    Traceback (most recent call last):
    ...
    tpsurgery.errors.RecipeError: recipe field `exit_layer`: 31 is out of range for a model with 30 decoder layers (allowed: 0..30 or -31..-1; 0 = embedding output, 30 = final-norm output)
      and recipe field `tp.spans.0`: span [1, 40) exceeds the model's 30 decoder layers (allowed: 0 <= start < stop <= 30; decoder layers are numbered 0..29)
    """
    errors: list[RecipeError] = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except RecipeError as exc:
            errors.append(exc)

    m = recipe.exit_layer if exit_layer is None else exit_layer
    if m != "auto":
        check(resolve_exit_layer, m, n_layers)
    for k, span in enumerate(recipe.tp.spans):
        check(_span_layers, span, n_layers, f"tp.spans.{k}")
    if recipe.tp.resume is not None and recipe.tp.resume >= n_layers:
        errors.append(RecipeError("tp.resume", f"{recipe.tp.resume} is not a layer of this model ({n_layers} decoder "
                                               f"layers; allowed: 0..{n_layers - 1})"))
    if recipe.attention.layers is not None:
        check(_span_layers, recipe.attention.layers, n_layers, "attention.layers")
    for k, spec in enumerate(recipe.edits):
        if spec.layer_list()[-1] >= n_layers:
            errors.append(RecipeError(f"edits.{k}.layers", f"layer {spec.layer_list()[-1]} is not a decoder layer of "
                                                           f"this model (allowed: 0..{n_layers - 1})"))
        if spec.heads is not None and n_heads is None:
            errors.append(RecipeError(f"edits.{k}.heads", "this model's number of attention heads is unknown"))
        elif spec.heads is not None and max(spec.heads) >= n_heads:
            errors.append(RecipeError(f"edits.{k}.heads", f"head {max(spec.heads)} does not exist (allowed: "
                                                          f"0..{n_heads - 1})"))
    if errors:
        raise RecipeError.combine(errors)


def _warn_dropped(tp, m: int) -> None:
    """One warning when the exit layer cuts off explicitly scheduled TP layers (``resume`` runs up to M by design)."""
    cut = [f"tp.spans.{k} [{s.start}, {s.stop})" for k, s in enumerate(tp.spans) if s.stop > m]
    if cut:
        read = "the embedding output" if m == 0 else f"the output of decoder layer {m - 1}"
        warnings.warn(f"{', '.join(cut)}: TP before decoder layers >= {m} is dropped, because exit_layer reads "
                      f"hidden_states[{m}] ({read}), which later layers cannot change", UserWarning, stacklevel=3)


_EDIT_FIELDS = {f.name for f in fields(Edit)}


def _user_edits(recipe: Recipe, m: int, hidden_size: int, attn_width: int | None) -> list[Edit]:
    """The recipe's ``edits`` section, one :class:`Edit` per layer; layers that cannot change the read are dropped.
    Each op's parameters become the Edit's fields of the same name (``value`` becomes ``vector``)."""
    out, cut = [], []
    for k, spec in enumerate(recipe.edits):
        field = f"edits.{k}"
        layers = spec.layer_list()  # layer and head numbers: checked by check_depth
        params = {n: getattr(spec, n) for n in OPS[spec.op].parameters if n in _EDIT_FIELDS}
        if getattr(spec, "value", None) is not None:
            size = attn_width if spec.site == "attn_out_in" else hidden_size
            if size is None:
                raise RecipeError(f"{field}.value", "the width of this model's o_proj input is unknown")
            params["vector"] = Vector(edit_vector(spec, size, field))
        kept = [i for i in layers if spec.site == "embed" or i < m]
        if len(kept) < len(layers):
            cut.append(f"{field} (layers {', '.join(str(i) for i in layers if i not in kept)})")
        out += [Edit(spec.site, i, spec.op, rows=spec.rows, heads=spec.heads, field=field, **params) for i in kept]
    if cut:
        warnings.warn(f"{', '.join(cut)}: dropped, because exit_layer reads hidden_states[{m}], which edits of "
                      f"layers >= {m} cannot change", UserWarning, stacklevel=3)
    return out


def _shorthand_edits(recipe: Recipe, n_layers: int, m: int, hidden_size: int) -> list[Edit]:
    """The ``tp``, ``placeholder`` and ``attention`` sections as edits."""
    tp = recipe.tp
    layers: list[int] = []
    for k, span in enumerate(tp.spans):
        layers.extend(_span_layers(span, n_layers, f"tp.spans.{k}"))
    if tp.resume is not None:
        if tp.resume >= n_layers:
            raise RecipeError("tp.resume", f"{tp.resume} is not a layer of this model ({n_layers} decoder layers)")
        layers.extend(range(tp.resume, n_layers))
    # TP before layer i only changes hidden_states[j] for j > i: layers >= M never influence the read.
    tp_layers = sorted(i for i in set(layers) if i < m)
    _warn_dropped(tp, m)
    edits = []
    init = initial_vector(recipe, hidden_size)
    if init is not None:
        edits.append(Edit("embed", 0, "write", vector=Vector(init), field="placeholder.init"))
    if recipe.placeholder.mask == "first_layer" and m > 0:
        edits.append(Edit("attn_mask", 0, "hide", field="placeholder.mask"))
    att = recipe.attention
    if att.bidirectional != "none":
        rng = _span_layers(att.layers, n_layers, "attention.layers") if att.layers else range(n_layers)
        edits += [Edit("attn_mask", i, "bidirectional", mode=att.bidirectional, field="attention.bidirectional")
                  for i in rng if i < m]
    edits += [Edit("layer_in", i, "copy", source=tp.source, alpha=tp.alpha, field="tp") for i in tp_layers]
    return edits


def compile_plan(recipe: Recipe, n_layers: int, hidden_size: int, placeholder_id: int | None = None,
                 exit_layer: int | None = None, n_heads: int | None = None, attn_width: int | None = None) -> Plan:
    """Check a recipe against a model's depth and compile it to edits. ``exit_layer`` overrides the recipe's.

    ``n_heads`` / ``attn_width``: attention heads and width of the o_proj input (edits with ``heads``, and ``write``
    at ``attn_out_in``, need them). Edits run sorted by layer, then site (:data:`tpsurgery.edits.SITES`); edits at one site run in recipe order,
    the shorthand sections (``placeholder``, ``attention``, ``tp``) before the ``edits`` section.
    """
    check_depth(recipe, n_layers, exit_layer, n_heads)
    tokens, k, reads, weights = _pooling(recipe, n_layers, exit_layer)
    m = exit_layer if exit_layer is not None else recipe.exit_layer
    if reads is not None:
        m = max(reads)
    elif m == "auto":
        raise RecipeError("exit_layer", "'auto' must be resolved from a sweep first (tpsurgery sweep)")
    else:
        m = resolve_exit_layer(m, n_layers)
    edits = _shorthand_edits(recipe, n_layers, m, hidden_size) + _user_edits(recipe, m, hidden_size, attn_width)
    edits.sort(key=lambda e: e.runs_at)  # stable: recipe order inside a site
    used = {e.run for e in edits if e.run is not None}
    return Plan(
        n_layers=n_layers,
        exit_layer=m,
        edits=tuple(edits),
        pooling=tokens,
        placeholder_id=recipe.placeholder.token_id if placeholder_id is None else placeholder_id,
        hide_placeholders=recipe.placeholder.mask == "all",
        runs=tuple((name, t) for name, t in recipe.runs.items() if name in used),
        n_heads=n_heads,
        reach=min([e.reach for e in edits] + [recipe.tp.source, -k]),
        pool_k=k,
        read_layers=tuple(reads) if reads is not None else (m,),
        read_weights=weights,
    )


def _pooling(recipe: Recipe, n_layers: int, exit_layer: int | None) -> tuple[str, int, list[int] | None, tuple | None]:
    """``(token pooling, k, resolved hidden_states indices or None, weights)`` of the recipe's ``pooling``."""
    p = recipe.pooling
    if not isinstance(p, PoolingSpec):
        return p, 1, None, None
    layers = p.layer_list()
    if layers is None:
        return p.tokens, p.k or 1, None, p.weights
    reads = []
    for j in layers:
        try:
            reads.append(resolve_exit_layer(j, n_layers))
        except RecipeError as exc:
            raise RecipeError("pooling.layers", exc.message) from None
    m = max(reads)
    for name, value in (("exit_layer", recipe.exit_layer), ("the exit-layer override", exit_layer)):
        if value not in (None, -1, "auto") and resolve_exit_layer(value, n_layers) != m:
            raise RecipeError("pooling.layers", f"reads up to hidden_states[{m}] but {name} is {value}: leave "
                                                f"exit_layer out (or set it to {m}) when pooling.layers is given")
    return p.tokens, p.k or 1, reads, p.weights
