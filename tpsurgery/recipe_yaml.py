r"""Reading recipe text safely: plain YAML only (no tags, no duplicate keys, bounded alias expansion), JSON read as
JSON, and syntax errors that name the file first.

>>> load_yaml("tp: {start: 1, stop: 2}")
{'tp': {'start': 1, 'stop': 2}}
>>> load_yaml("a: 1\na: 2")
Traceback (most recent call last):
...
tpsurgery.errors.RecipeError: recipe field `a`: appears twice in the same mapping (line 2)
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from .errors import RecipeError


def load_yaml(text: str) -> Any:
    """``yaml.SafeLoader`` (no python/* tags) that also refuses duplicate keys, which YAML resolves silently.

    JSON objects are read by :mod:`json` first: PyYAML splits JSON's surrogate-pair escapes (``json.dumps`` of an
    emoji) into two lone surrogates and refuses characters JSON allows (U+FFFE).
    """
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError:
            pass  # flow-style YAML, not JSON
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        _check_duplicates(node, (), set())
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _json_object(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise RecipeError(k, "appears twice in the same mapping")
    return dict(pairs)


def _check_duplicates(node: Any, path: tuple, seen_nodes: set) -> None:
    if id(node) in seen_nodes:  # an alias: checked where it was defined (walking it again can be exponential)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise RecipeError(".".join((*path, key)),
                                  f"appears twice in the same mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
            _check_duplicates(value_node, (*path, str(key)), seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, (*path, str(i)), seen_nodes)


_PLAIN = (str, int, float, bool, type(None))
_MAX_VALUES = 10_000


def check_plain(value: Any, path: tuple, budget: list | None = None) -> None:
    """Recipes hold strings, numbers, booleans, null, lists and mappings with string keys: nothing a YAML tag made.

    At most ``_MAX_VALUES`` values in all: YAML aliases can make a 1 kB file expand exponentially ("billion laughs").
    """
    budget = [_MAX_VALUES] if budget is None else budget
    budget[0] -= 1
    where = ".".join(map(str, path)) or "<recipe>"
    if budget[0] < 0 or len(path) > 32:
        raise RecipeError("<recipe>" if budget[0] < 0 else str(path[0]), f"the recipe is too large or too deeply nested "
                          f"(more than {_MAX_VALUES} values or 32 levels; YAML aliases that expand?)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(where, f"keys must be strings, got {type(k).__name__} {k!r}")
            check_plain(v, (*path, k), budget)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, (*path, i), budget)
    elif not isinstance(value, _PLAIN):
        raise RecipeError(where, f"a {type(value).__name__} value (from a YAML tag such as !!binary, !!set or a date?) "
                                 "is not allowed: use strings, numbers, booleans, lists and mappings")


def yaml_error(exc: yaml.YAMLError, origin: str | None) -> str:
    r"""``FILE, line L, column C: not valid YAML: PROBLEM (CONTEXT at line l, column c)``: where first (the file when
    known, not PyYAML's ``"<unicode string>"``), then what.

    >>> try:
    ...     yaml.safe_load("tp: {start: 1, stop: 2\nexit_layer: 3")
    ... except yaml.YAMLError as exc:
    ...     print(yaml_error(exc, "r.yaml"))
    r.yaml, line 2, column 11: not valid YAML: expected ',' or '}', but got ':' (while parsing a flow mapping at line 1, column 5)
    """
    mark = getattr(exc, "problem_mark", None)
    where = ", ".join(filter(None, [origin, f"line {mark.line + 1}, column {mark.column + 1}" if mark else None]))
    problem = getattr(exc, "problem", None) or str(exc).replace('in "<unicode string>", ', "")
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and cmark is not None:
        problem += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        problem += f" ({context})"
    if "tag" in problem:
        problem += "; only plain YAML is accepted, no tags"
    return f"{where + ': ' if where else ''}not valid YAML: {problem}"
