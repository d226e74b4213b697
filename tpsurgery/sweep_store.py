"""Where sweeps are stored, and ``exit_layer: auto``: the best exit layer of the recipe's own TP row in a stored sweep.

A sweep (:mod:`tpsurgery.sweep`) is stored in the cache under the model's fingerprint, the hash of the recipe with
TP and exit layer removed (:func:`base_recipe`), so every TP schedule of one prompt finds the same folder, and the
data it scored (task and a digest of the pairs: a ``--limit 60`` sweep never replaces the full-data one).
``exit_layer: auto`` reads the stored sweep with the most pairs (the newest of equals).
A sweep stored by other tpsurgery code or other library versions (:func:`tpsurgery.buildinfo.build_info`, recorded in
the file) still answers ``auto``, with a warning that its scores may be stale.

>>> from tpsurgery.recipe import parse_recipe
>>> a, b = parse_recipe("prompt: '<PST> {text}'\\ntp: {start: 1, stop: 3}"), parse_recipe("prompt: '<PST> {text}'")
>>> sweep_path("fp", a, "stsb-dev", "d1") == sweep_path("fp", b.replace(exit_layer=2), "stsb-dev", "d1")
True
>>> sweep_path("fp", a, "stsb-dev", "d1") == sweep_path("fp", a, "stsb-dev", "d2"), sweep_path("fp", a).parent.parent.name
(False, 'fp')
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


def sweep_folder(fingerprint: str, recipe: Recipe) -> Path:
    """The folder of every stored sweep of ``recipe`` (any TP / exit layer, any data) on the fingerprinted model."""
    return cache_dir() / "sweeps" / fingerprint / base_recipe(recipe).hash()


def sweep_path(fingerprint: str, recipe: Recipe, task: str = "", data: str = "") -> Path:
    """Where the sweep of ``recipe`` on the fingerprinted model, scored on ``task`` pairs with digest ``data``
    (:func:`pairs_digest`), is stored."""
    return sweep_folder(fingerprint, recipe) / f"{task or 'task'}.{data or 'data'}.json"


def pairs_digest(pairs: Any) -> str:
    """A digest of the scored pairs (both sentences and the gold score of each, in order): the sweep's data key.

    >>> from types import SimpleNamespace
    >>> p = SimpleNamespace(a=("x", "y"), b=("z", "w"), gold=[1.0, 2.0])
    >>> pairs_digest(p) == pairs_digest(SimpleNamespace(a=("x",), b=("z",), gold=[1.0]))
    False
    """
    import hashlib

    body = json.dumps([list(pairs.a), list(pairs.b), [float(g) for g in pairs.gold]])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _stored_sweeps(fingerprint: str, recipe: Recipe) -> list[Path]:
    """The stored sweeps of ``recipe``, the one ``auto`` reads first: most pairs, then newest."""
    from .models import check_cache_tree

    folder = sweep_folder(fingerprint, recipe)
    check_cache_tree(folder)  # another user who may write there could choose our exit layer
    found = []
    for p in folder.glob("*.json") if folder.is_dir() else ():
        try:
            n = int(json.loads(p.read_text(encoding="utf-8")).get("n_pairs", 0))
            found.append((n, p.stat().st_mtime_ns, p))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def _tp_key(recipe: Recipe) -> str:
    return json.dumps(recipe.tp.model_dump(mode="json"), sort_keys=True)


def resolve_auto_exit(model: Any, recipe: Recipe, path: str | os.PathLike | None = None) -> int:
    """The best exit layer for ``recipe``'s TP schedule from the stored sweep (``exit_layer: auto``)."""
    fp = model_fingerprint(model)
    hint = "run `tpsurgery sweep` with this recipe and model first (it stores the result for 'auto')"
    if path is None:
        stored_sweeps = _stored_sweeps(fp, recipe)
        if not stored_sweeps:
            raise RecipeError("exit_layer", f"'auto' needs a stored sweep for this model and recipe; none in "
                                            f"{sweep_folder(fp, recipe)}: {hint}")
        p = stored_sweeps[0]
    else:
        p = Path(path)
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
