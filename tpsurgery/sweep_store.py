"""Where sweeps are stored, and ``exit_layer: auto``: the best exit layer of the recipe's own TP row in a stored sweep.

A sweep (:mod:`tpsurgery.sweep`) is stored in the cache under the model's fingerprint and the hash of the recipe with
TP and exit layer removed (:func:`base_recipe`), so every TP schedule of one prompt finds the same file. A sweep stored by other tpsurgery code or other library
versions (:func:`tpsurgery.buildinfo.build_info`, recorded in the file) still answers ``auto``, with a warning that
its scores may be stale.

>>> from tpsurgery.recipe import parse_recipe
>>> a, b = parse_recipe("prompt: '<PST> {text}'\\ntp: {start: 1, stop: 3}"), parse_recipe("prompt: '<PST> {text}'")
>>> sweep_path("fp", a) == sweep_path("fp", b.replace(exit_layer=2)), sweep_path("fp", a).parent.name
(True, 'fp')
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .buildinfo import build_info
from .cache import model_fingerprint  # exact (every weight), memoized; also keys the embedding cache
from .errors import RecipeError
from .models import cache_dir
from .recipe import Recipe, parse_recipe


def base_recipe(recipe: Recipe) -> Recipe:
    """The recipe with no TP and ``exit_layer: auto``: what a sweep varies is removed (its hash keys the store)."""
    return recipe.replace(tp={}, exit_layer="auto", name="", description="")


def sweep_path(fingerprint: str, recipe: Recipe) -> Path:
    """Where the sweep of ``recipe`` (any TP / exit layer) on the fingerprinted model is stored."""
    return cache_dir() / "sweeps" / fingerprint / f"{base_recipe(recipe).hash()}.json"


def _tp_key(recipe: Recipe) -> str:
    return json.dumps(recipe.tp.model_dump(mode="json"), sort_keys=True)


def resolve_auto_exit(model: Any, recipe: Recipe, path: str | os.PathLike | None = None) -> int:
    """The best exit layer for ``recipe``'s TP schedule from the stored sweep (``exit_layer: auto``)."""
    fp = model_fingerprint(model)
    p = Path(path) if path is not None else sweep_path(fp, recipe)
    hint = "run `tpsurgery sweep` with this recipe and model first (it stores the result for 'auto')"
    if not p.is_file():
        raise RecipeError("exit_layer", f"'auto' needs a stored sweep for this model and recipe; none at {p}: {hint}")
    stored = json.loads(p.read_text(encoding="utf-8"))
    if stored.get("build") != build_info():
        warnings.warn(f"exit_layer 'auto': the sweep at {p} was stored by other tpsurgery code or library versions "
                      f"({stored.get('build', 'not recorded')} vs {build_info()}); its best exit layer may be stale: "
                      "rerun `tpsurgery sweep` with this recipe and model to refresh it", UserWarning, stacklevel=3)
    want = _tp_key(recipe)
    for row in stored["rows"]:
        if row.get("placeholder_mask") == "all":
            continue  # the hidden-placeholder baseline stands for the prompt without marker, not for this recipe
        if json.dumps(parse_recipe({**recipe.to_dict(), "tp": row["tp"]}).tp.model_dump(mode="json"),
                      sort_keys=True) == want:
            scores = np.array(row["scores"], dtype=np.float64)
            return int(np.nanargmax(scores))
    raise RecipeError("exit_layer", f"'auto': the sweep at {p} has no row for tp={want}; rows: "
                      f"{', '.join(r['label'] for r in stored['rows'])}. {hint}")
