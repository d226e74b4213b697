"""Recipes: the declarative, immutable description of one embedding method.

>>> from tpsurgery.recipe import Recipe, dump_recipe, parse_recipe
>>> r = parse_recipe('''
... prompt: 'This sentence : <PST> "{text}" means in one word:"'
... tp: {start: 1, stop: 2}
... exit_layer: 28
... ''')
>>> r.tp.spans[0].start, r.tp.spans[0].stop, r.exit_layer, r.pooling
(1, 2, 28, 'last')
>>> parse_recipe(dump_recipe(r)) == r
True

Semantics (see docs/recipes.md for the full reference):

* ``prompt``: a template with one or more ``{text}`` slots and zero or more ``<PST>`` markers; a list of templates
  averages their embeddings (MetaEOL); ``null`` means the bare sentence. The token sequence is the tokenization of the
  template with every marker (and one space after it) removed, with one placeholder token inserted at each marker's
  token boundary (before the token that holds the character after the marker).
* ``tp.spans``: 0-based half-open spans ``[start, stop)`` of decoder layers; before each such layer the placeholder rows
  of the layer input are overwritten by the source row (``tp.source``, negative index from the end; -1 = last token).
  ``tp.resume: R`` turns TP back on from layer R up to the exit layer (Table 16 of the paper).
* ``exit_layer: M`` reads what Hugging Face calls ``hidden_states[M]``: 0 is the embedding output, M the output of
  decoder layer M-1 (decoder layers are numbered from 0, as in ``tp.spans``), and ``n_layers`` the final-norm output. Negative values count from the end like Python indexing
  of that tuple (-1 = final-norm output, -3 = output of decoder layer n_layers-2).
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .ops import EditSpec
from .recipe_errors import error_from_validation
from .recipe_yaml import check_plain, load_yaml, yaml_error
from .schema import NUM as _NUM, SEED as _SEED, Frozen as _Frozen, PoolingSpec, Span

PLACEHOLDER_MARKER = "<PST>"
TEXT_SLOT = "{text}"
MAX_RECIPE_BYTES = 1_000_000


_TAG_LIKE = re.compile(r"<\s*([A-Za-z][A-Za-z ]{0,5}?)\s*>|<\s*PST\b(?!\s*>)|(?<![<A-Za-z])PST\s*>", re.IGNORECASE)


def marker_typos(template: str) -> list[str]:
    """Substrings of ``template`` that look like a mistyped ``<PST>`` marker (they are kept as plain text).

    >>> marker_typos('This : <PTS> "{text}" <pst> <s> <PST> <POS> PST> <PST')
    ['<PTS>', '<pst>', 'PST>', '<PST']
    """
    out = []
    for m in _TAG_LIKE.finditer(template):
        text, word = m.group(0), (m.group(1) or "PST").replace(" ", "").upper()
        if text == PLACEHOLDER_MARKER:
            continue
        if sorted(word) == sorted("PST") or difflib.SequenceMatcher(None, word, "PST").ratio() >= 0.8:
            out.append(text)
    return out


def _typo_hint(templates: tuple[str, ...]) -> str:
    typos = [t for template in templates for t in marker_typos(template)]
    return f" (found {', '.join(map(repr, typos))}: did you mean {PLACEHOLDER_MARKER}?)" if typos else ""


class TPSchedule(_Frozen):
    """When and how the placeholder rows are overwritten.

    Accepts the shorthand ``{start: a, stop: b}`` (one span) or a list of spans as ``tp``.
    """

    SHORTHAND_KEYS: ClassVar[tuple[str, ...]] = ("start", "stop")  # accepted beside the fields (error messages)

    spans: tuple[Span, ...] = ()
    resume: Annotated[int, Field(ge=0), _NUM] | None = None
    alpha: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False), _NUM] = 1.0
    source: Annotated[int, Field(le=-1), _NUM] = -1

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            return {"spans": list(data)}
        if isinstance(data, dict) and ("start" in data or "stop" in data):
            data = dict(data)
            span = {k: data.pop(k) for k in ("start", "stop") if k in data}
            if "spans" in data:
                raise ValueError("give either start/stop or spans, not both")
            data["spans"] = [span]
        return data

    @model_validator(mode="after")
    def _disjoint(self) -> "TPSchedule":
        ordered = sorted(self.spans, key=lambda s: s.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.stop:
                raise ValueError(f"spans overlap: [{a.start}, {a.stop}) and [{b.start}, {b.stop})")
        if self.resume is not None and ordered and self.resume < ordered[-1].stop:
            raise ValueError(f"resume ({self.resume}) must not come before the end of the last span ({ordered[-1].stop})")
        return self

    @property
    def empty(self) -> bool:
        return not self.spans and self.resume is None


class Placeholder(_Frozen):
    """The placeholder token: which existing token id carries it and what vector it starts from.

    ``init``: ``token`` (the embedding row of ``token_id``, or of ``token`` text that is a single token), ``zeros``,
    ``ones``, ``uniform`` (U[0, 1)), ``gaussian`` (N(mean, std) from ``seed``).

    ``mask``: ``none``; ``first_layer``: no other token attends to the placeholder in decoder layer 0 (Table 15 of the
    paper; it keeps its position id); ``all``: the placeholder is invisible everywhere (attention mask 0, so it takes
    no position id either): with an empty TP schedule this is exactly the prompt without the marker.
    """

    init: Literal["token", "zeros", "ones", "uniform", "gaussian"] = "token"
    token_id: Annotated[int, Field(ge=0), _NUM] = 0
    token: str | None = None
    seed: Annotated[int, _NUM, _SEED] = 0
    mean: Annotated[float, Field(allow_inf_nan=False), _NUM] = 0.0
    std: Annotated[float, Field(gt=0.0, allow_inf_nan=False), _NUM] = 1.0
    mask: Literal["none", "first_layer", "all"] = "none"


class Attention(_Frozen):
    """Attention-mask edits (bidirectional baselines, Table 6 of the paper); ``layers`` limits them to a span.

    ``last_token``: every position from the first placeholder onward also attends to the last token.
    ``sentence``: the span from the first placeholder to the end of the sentence attends bidirectionally within itself.
    """

    bidirectional: Literal["none", "last_token", "sentence"] = "none"
    layers: Span | None = None


class Recipe(_Frozen):
    """One embedding method, validated and immutable. See the module docstring for the semantics."""

    name: str = ""
    description: str = ""
    prompt: Union[str, tuple[str, ...], None] = None
    preprocess: Union[bool, Literal["auto"]] = "auto"
    placeholder: Placeholder = Placeholder()
    tp: TPSchedule = TPSchedule()
    exit_layer: Annotated[Union[int, Literal["auto"]], _NUM] = -1
    pooling: Union[Literal["last", "mean"], PoolingSpec] = "last"
    attention: Attention = Attention()
    compat: Literal["exact", "official"] = "exact"
    runs: dict[str, str] = Field(default_factory=dict)
    edits: tuple[EditSpec, ...] = ()

    @field_validator("prompt")
    @classmethod
    def _templates(cls, v: Any) -> Any:
        templates = (v,) if isinstance(v, str) else v
        if templates is not None:
            if len(templates) == 0:
                raise ValueError("a prompt list needs at least one template")
            for k, t in enumerate(templates):
                if TEXT_SLOT not in t:
                    raise RecipeError("" if isinstance(v, str) else str(k), f"template {t!r} has no {TEXT_SLOT} slot")
                if marker_typos(t):
                    warnings.warn(f"recipe field `prompt`: {', '.join(map(repr, marker_typos(t)))} in {t!r} is plain "
                                  f"text, not a placeholder marker: did you mean {PLACEHOLDER_MARKER}?", UserWarning,
                                  stacklevel=2)
        return v

    @field_validator("runs")
    @classmethod
    def _runs(cls, v: dict[str, str]) -> dict[str, str]:
        problems = []
        for name, t in v.items():
            if not name.isidentifier():
                problems.append((name, "a run name must be an identifier (letters, digits, underscores)"))
            if TEXT_SLOT not in t:
                problems.append((name, f"template {t!r} has no {TEXT_SLOT} slot"))
            if PLACEHOLDER_MARKER in t:
                problems.append((name, f"an auxiliary run is a plain prompt: it cannot hold a {PLACEHOLDER_MARKER}"))
        if problems:
            raise RecipeError(*problems[0], more=problems[1:])
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        """Whole-recipe checks; every problem at once."""
        counts = {t.count(PLACEHOLDER_MARKER) for t in self.templates}
        hint = _typo_hint(self.templates) if counts == {0} else ""
        problems = []
        if not self.tp.empty and counts == {0}:
            problems.append(("tp", f"a TP schedule needs a {PLACEHOLDER_MARKER} marker in the prompt (it has none)"
                             + hint))
        if self.placeholder.mask != "none" and counts == {0}:
            problems.append(("placeholder.mask", f"needs a {PLACEHOLDER_MARKER} marker in the prompt (it has none)"
                             + hint))
        if self.attention.bidirectional != "none" and counts == {0}:
            problems.append(("attention.bidirectional",
                             f"starts at the placeholder: the prompt needs a {PLACEHOLDER_MARKER} marker" + hint))
        for k, e in enumerate(self.edits):
            run = getattr(e, "run", None)
            if run is not None and run not in self.runs:
                close = difflib.get_close_matches(run, list(self.runs), n=1, cutoff=0.6)
                known = ", ".join(self.runs) or "none; add a `runs:` section"
                mean = f"; did you mean {close[0]!r}?" if close else ""
                problems.append((f"edits.{k}.run", f"no run named {run!r}{mean} (runs: {known})"))
            fixed = e.rows == "last" or isinstance(e.rows, int) or isinstance(e.rows, tuple) and max(e.rows) < 0
            if run is not None and not fixed:
                why = "has no placeholders to take rows from" if e.rows == "placeholders" else \
                    f"gives its rows at the same positions counted from the end (not {e.rows!r})"
                problems.append((f"edits.{k}.rows", f"an auxiliary run {why}: use rows: last, a negative position or "
                                                    "a list of them"))
            needs_marker = e.rows == "placeholders" and e.op != "bidirectional"
            if (needs_marker or e.op == "bidirectional") and counts == {0}:
                problems.append((f"edits.{k}", f"rows: placeholders needs a {PLACEHOLDER_MARKER} marker in the "
                                               "prompt (it has none); use rows: last or a negative position" + hint))
        if problems:
            raise RecipeError(*problems[0], more=problems[1:])
        return self

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompt templates (``("{text}",)`` when there is no prompt)."""
        if self.prompt is None:
            return (TEXT_SLOT,)
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    @property
    def preprocessing(self) -> bool:
        """Whether the reference sentence preprocessing runs (``auto``: on when there is a prompt)."""
        return self.prompt is not None if self.preprocess == "auto" else bool(self.preprocess)

    def replace(self, **changes: Any) -> "Recipe":
        """A validated copy with top-level fields replaced (``recipe.replace(exit_layer=20)``)."""
        return parse_recipe({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; empty ``runs`` / ``edits`` sections are left out (hashes of recipes without
        them stay what they were before the sections existed). A vector file is ``{path, sha256}`` (absolute path)."""
        data = self.model_dump(mode="json")
        if isinstance(self.pooling, PoolingSpec):
            data["pooling"] = self.pooling.model_dump(mode="json", exclude_defaults=True)
        data["edits"] = [e.model_dump(mode="json", exclude_defaults=True) for e in self.edits]
        for key in ("runs", "edits"):
            if not data[key]:
                del data[key]
        return data

    def hash(self) -> str:
        """A stable short hash of the recipe's semantics (name and description excluded; a vector file by its
        content hash, not its path)."""
        import hashlib

        body = {k: v for k, v in self.to_dict().items() if k not in ("name", "description")}
        for e in body.get("edits", ()):  # a vector file counts by its content, wherever it lies
            if isinstance(e.get("value"), dict):
                e["value"] = {"sha256": e["value"]["sha256"]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def parse_recipe(source: str | dict | Recipe, base: str | Path | None = None, *, origin: str | None = None) -> Recipe:
    """A Recipe from YAML/JSON text, a mapping, or a Recipe. Errors are :class:`RecipeError` naming the field;
    ``origin`` (a file name) starts YAML syntax errors.

    ``base``: the folder relative vector-file paths (``value: v.npy``) resolve against (default: the working
    directory; :func:`read_recipe` passes the recipe file's folder)."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, str):
        if len(source.encode()) > MAX_RECIPE_BYTES:
            raise RecipeError("<recipe>", f"recipe text is larger than {MAX_RECIPE_BYTES} bytes")
        try:
            source = load_yaml(source)
        except RecipeError:
            raise
        except yaml.YAMLError as exc:
            raise RecipeError("<recipe>", yaml_error(exc, origin)) from None
        except RecursionError:
            raise RecipeError("<recipe>", "the YAML is nested too deeply") from None
        if isinstance(source, dict):
            check_plain(source, ())
    if source is None:
        source = {}
    if not isinstance(source, dict):
        raise RecipeError("<recipe>", f"a recipe must be a mapping of fields, got {type(source).__name__}")
    try:
        return Recipe.model_validate(source, context={"base": str(base) if base is not None else None})
    except ValidationError as exc:
        err = error_from_validation(exc, Recipe, source)
        seen = {f for f, _ in err.problems}  # the whole-recipe checks too, read from the raw data: one round
        more = [p for p in _raw_run_problems(source) if p[0] not in seen]
        err = RecipeError(*err.problems[0], more=[*err.problems[1:], *more])
        err.data = source  # for checks against a model (`recipe validate --model`: layer_problems)
        raise err from None


def _raw_run_problems(data: dict) -> list[tuple[str, str]]:
    """``edits.K.run`` naming no run of ``runs``, from raw recipe data (when other fields did not validate)."""
    runs = data.get("runs") if isinstance(data.get("runs"), dict) else {}
    edits = data.get("edits") if isinstance(data.get("edits"), list) else []
    out = []
    for k, e in enumerate(edits):
        run = e.get("run") if isinstance(e, dict) else None
        if isinstance(run, str) and run not in runs:
            close = difflib.get_close_matches(run, list(runs), n=1, cutoff=0.6)
            known = ", ".join(runs) or "none; add a `runs:` section"
            out.append((f"edits.{k}.run", f"no run named {run!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" (runs: {known})"))
    return out


def layer_problems(data: Any, n_layers: int) -> list[tuple[str, str]]:
    """Layer numbers of raw recipe data outside a model with ``n_layers`` decoder layers (``tp`` spans and
    ``resume``, ``edits.K.layers``, ``exit_layer``): checked even when other fields did not validate.

    >>> layer_problems({"tp": {"start": 1, "stop": 40}, "edits": [{"layers": [2, 31]}], "exit_layer": -40}, 30)
    [('tp.stop', 'is 40, beyond the model: 30 decoder layers (0-29; stop <= 30)'), ('edits.0.layers', 'layer 31 is beyond the model: 30 decoder layers (0-29)'), ('exit_layer', 'is -40: the model has hidden_states[0..30] (-31..30)')]
    """
    def num(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    out: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        return out
    tp = data.get("tp")
    if isinstance(tp, dict):
        spans = tp.get("spans") if isinstance(tp.get("spans"), list) else [tp]
        for k, sp in enumerate(spans):
            where = "tp" if sp is tp else f"tp.spans.{k}"
            if isinstance(sp, dict) and num(sp.get("stop")) and sp["stop"] > n_layers:
                out.append((f"{where}.stop", f"is {sp['stop']}, beyond the model: {n_layers} decoder layers "
                                             f"(0-{n_layers - 1}; stop <= {n_layers})"))
        if num(tp.get("resume")) and not 0 <= tp["resume"] < n_layers:
            out.append(("tp.resume", f"is {tp['resume']}: the model has decoder layers 0-{n_layers - 1}"))
    for k, e in enumerate(data.get("edits") if isinstance(data.get("edits"), list) else []):
        layers = e.get("layers") if isinstance(e, dict) else None
        if isinstance(layers, dict):
            layers = [layers.get("stop", 0) - 1] if num(layers.get("stop")) else []
        for layer in layers if isinstance(layers, list) else [layers]:
            if num(layer) and not 0 <= layer < n_layers:
                out.append((f"edits.{k}.layers", f"layer {layer} is beyond the model: {n_layers} decoder layers "
                                                 f"(0-{n_layers - 1})"))
                break
    e = data.get("exit_layer")
    if num(e) and not -(n_layers + 1) <= e <= n_layers:
        out.append(("exit_layer", f"is {e}: the model has hidden_states[0..{n_layers}] ({-(n_layers + 1)}..{n_layers})"))
    return out


def read_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a YAML (or JSON) file; errors name the file. Shipped recipes by name:
    :func:`tpsurgery.library.load_recipe` (``tpsurgery.load_recipe``).

    >>> from tpsurgery.library import RECIPE_DIR
    >>> read_recipe(RECIPE_DIR / "prompteol-tp.yaml").tp.spans[0].stop
    8
    """
    from .errors import InputError
    from .textio import read_bounded

    p = Path(path)
    try:  # a regular file, read with a bound (a device or FIFO is refused, /dev/zero never read to the end)
        text = read_bounded(p, MAX_RECIPE_BYTES, "recipe").decode("utf-8")
    except InputError as exc:
        raise RecipeError("<recipe>", str(exc)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError("<recipe>", f"cannot read {p} as UTF-8 text: {exc}") from None
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise RecipeError("<recipe>", f"{p} is empty (an empty file is not the default recipe; write at least one "
                                      "field, e.g. `exit_layer: -1`, or name a shipped recipe)")
    try:
        recipe = parse_recipe(text, base=p.resolve().parent, origin=str(p))
    except RecipeError as exc:
        named = exc.message.startswith(str(p))  # a YAML syntax error already starts with the file
        err = RecipeError(exc.field, exc.message if named else f"{exc.message} (in {p})", more=exc.problems[1:])
        err.data = getattr(exc, "data", None)
        raise err from None
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """YAML text that :func:`parse_recipe` turns back into an equal recipe."""
    data = recipe.to_dict()
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    if yaml.safe_load(text) != data:  # PyYAML writes U+0085 (NEL) raw in quoted scalars and reads it back as a break
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False, width=120)
    return text


def recipe_schema() -> dict[str, Any]:
    """The JSON schema of recipes."""
    return Recipe.model_json_schema()
