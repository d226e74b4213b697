"""Recipe validation errors in the user's words: pydantic's errors become one :class:`~tpsurgery.errors.RecipeError`
listing every problem, each under the field the user wrote, with "did you mean" for unknown keys, an op's own
parameters for an edit, and "(got ...)" for every wrong type.

>>> from tpsurgery.recipe import parse_recipe
>>> try:
...     parse_recipe({"prompt": "{text}", "tp": {"strat": 1, "stop": 2}, "exit_layer": "x"})
... except Exception as exc:
...     print(exc)
recipe field `tp.strat`: unknown key; did you mean `start`? (allowed here: spans, resume, alpha, source, start, stop)
  and recipe field `exit_layer`: Input should be a valid integer, unable to parse string as an integer (got 'x'); or: Input should be 'auto' (got 'x')
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import RecipeError
from .ops import OPS


_UNION_TAG = re.compile(r"^(int|str|float|bool|none|bytes|Span|TPSchedule|Placeholder|Attention|EditSpec|PoolingSpec|VectorFile|Positions)$"
                        r"|^(literal|tuple|list|dict|set|union|function-[a-z-]+)\[")


def _is_tag(loc: tuple, k: int) -> bool:
    """Whether ``loc[k]`` is a tag pydantic adds: a union member's type, or an edit's op (after ``edits.N``)."""
    p = loc[k]
    if isinstance(p, int):
        return False
    return bool(_UNION_TAG.match(str(p))) or (k >= 2 and loc[k - 2] == "edits" and isinstance(loc[k - 1], int)
                                              and p in OPS)


def _op_of(loc: tuple) -> str | None:
    """The op tag in an edit's error location (``("edits", 0, "copy", "factor")`` -> ``copy``)."""
    return next((str(loc[k]) for k in range(len(loc)) if _is_tag(loc, k) and loc[k] in OPS), None)


def _field_of(loc: tuple) -> str:
    """The dotted recipe field of a pydantic error location, without the union-member tags pydantic adds."""
    return ".".join(str(p) for k, p in enumerate(loc) if not _is_tag(loc, k)) or "<recipe>"


def _own_fields(error: dict) -> list[dict]:
    """A RecipeError raised inside a validator names its fields relative to the validator's location: one pydantic
    error per problem it lists."""
    inner = (error.get("ctx") or {}).get("error")
    if isinstance(inner, RecipeError):
        return [{**error, "loc": tuple(error["loc"]) + tuple(p for p in field.split(".") if p), "msg": message}
                for field, message in inner.problems]
    return [error]


def _got(value: Any) -> str:
    """What a wrong value was, for "(got ...)": a short scalar itself, else its kind.

    >>> _got(3), _got("x" * 80), _got([1, 2]), _got({"a": 1}), _got(None)
    ('3', 'a string of 80 characters', 'a list of 2 items', 'a mapping', 'None')
    """
    if value is None or (isinstance(value, (str, int, float, bool)) and len(repr(value)) <= 60):
        return repr(value)
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _message(error: dict) -> str:
    """Pydantic's message plus what the offending value was (every type error says "(got ...)")."""
    msg = error["msg"].removeprefix("Value error, ")
    op = _op_of(tuple(error["loc"]))
    if error["type"] == "missing" and op is not None and error["loc"][-2] == op:
        return f"op {op} needs `{error['loc'][-1]}`"
    if error["type"] == "union_tag_invalid":
        return f"unknown op {error['input'].get('op')!r} (allowed: {', '.join(OPS)})" \
            if isinstance(error.get("input"), dict) else msg
    if error["type"] == "union_tag_not_found":
        return f"needs `op` (allowed: {', '.join(OPS)})"
    if error["type"] not in ("value_error", "missing", "extra_forbidden") and "input" in error:
        msg += f" (got {_got(error['input'])})"
    return msg


def _user_field(field: str, source: Any) -> str:
    """Where the user wrote a field: ``tp: {start, stop}`` is the one-span shorthand, so pydantic's
    ``tp.spans.0.start`` is the user's ``tp.start`` (messages keep ``tp.spans.0``, as the plan's do)."""
    tp = source.get("tp") if isinstance(source, dict) else None
    if field.startswith("tp.spans.0.") and isinstance(tp, dict) and "spans" not in tp:
        return "tp." + field.removeprefix("tp.spans.0.")
    return field


def error_from_validation(exc: ValidationError, root: type[BaseModel], source: Any = None) -> RecipeError:
    """One RecipeError listing every problem: unknown keys first, each with the closest allowed key ("did you
    mean"); the alternatives of a union joined with "or". A field reported missing because its key was misspelt
    (``tp: {strat: 1, stop: 2}``: ``tp.spans.0.start``) is left out: the unknown key ``tp.strat`` says it. ``root``:
    the model validated (the recipe); ``source``: what the user wrote."""
    errors = [own for e in exc.errors() for own in _own_fields(e)]
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")  # stable: otherwise pydantic's order
    by_field: dict[str, list[dict]] = {}
    for e in errors:
        by_field.setdefault(_field_of(e["loc"]), []).append(e)
    meant = {f.rpartition(".")[0] + "." + close if "." in f else close
             for f, es in by_field.items() if es[0]["type"] == "extra_forbidden"
             for close in [_closest_key(es[0]["loc"], root)] if close}
    by_field = {f: es for f, es in by_field.items()
                if not (es[0]["type"] == "missing" and _user_field(f, source) in meant)}
    # a list given to a str-or-list field: the item's error says more than "not a string" of the whole
    fields = [f for f in by_field if not any(g.startswith(f + ".") for g in by_field)]
    problems = []
    for f in fields:
        first = by_field[f][0]
        if first["type"] == "extra_forbidden":
            problems.append((f, _unknown_key(first["loc"], root)))
        else:  # the alternatives of a union (exit_layer: an integer or 'auto')
            problems.append((f, "; or: ".join(dict.fromkeys(_message(e) for e in by_field[f]))))
    return RecipeError(*problems[0], more=problems[1:])


def _allowed_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    model = _model_at(loc[:-1], root)
    return list(model.model_fields) + list(getattr(model, "SHORTHAND_KEYS", ())) if model else []


def _closest_key(loc: tuple, root: type[BaseModel]) -> str | None:
    """The allowed key closest to the unknown key at ``loc`` (None: none is close)."""
    close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc, root), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(loc: tuple, root: type[BaseModel]) -> str:
    """``unknown key; did you mean `stop`? (allowed here: ...)`` for the key at ``loc``; in an edit, the op's own
    parameters."""
    op = _op_of(loc)
    if op is not None and len(loc) >= 2 and loc[-2] == op:  # a key of the edit itself, not of a nested mapping
        own = OPS[op].parameters
        close = difflib.get_close_matches(str(loc[-1]), list(OPS[op].spec.model_fields), n=1, cutoff=0.6)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        its = f"its parameters: {', '.join(own)}" if own else "it takes no parameters"
        return f"not a parameter of op {op}{hint} ({its}; every edit: site, layers, rows, heads)"
    allowed = _allowed_keys(loc, root)
    close = _closest_key(loc, root)
    hint = f"; did you mean `{close}`?" if close else ""
    return f"unknown key{hint} (allowed here: {', '.join(allowed) if allowed else 'see tpsurgery recipe schema'})"


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for k, part in enumerate(loc):
        if _is_tag(loc, k) and part in OPS:
            model = OPS[str(part)].spec
            continue
        if isinstance(part, int) or _is_tag(loc, k) or (model is root and part == "edits"):
            continue  # (an edit's model is named by the op tag that follows)
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        ann = info.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        nested += [a for c in candidates for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model
