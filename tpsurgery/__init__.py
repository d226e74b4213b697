"""tpsurgery: training-free surgery (Token Prepending and friends) that turns decoder LLMs into sentence embedders.

>>> import tpsurgery
>>> recipe = tpsurgery.load_recipe("smollm2-prompteol-tp")
>>> recipe.tp.spans[0].start, recipe.exit_layer
(1, -3)

The names below are imported on first use (PEP 562): ``import tpsurgery`` and the ``tpsurgery`` command start
without torch, so a Ctrl-C while torch loads reaches the command's own handler (one line, exit 130).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_WHERE = {
    "apply": "api", "as_recipe": "api", "ArchSpec": "arch", "register_architecture": "arch", "Embedder": "embedder",
    "BackendError": "errors", "InputError": "errors", "ModelError": "errors", "RecipeError": "errors",
    "TpsurgeryError": "errors", "load_recipe": "library", "DEFAULT_MODEL": "models", "load_model": "models",
    "Batch": "plan", "Plan": "plan", "collate": "plan", "compile_plan": "plan", "Recipe": "recipe",
    "dump_recipe": "recipe", "parse_recipe": "recipe", "recipe_schema": "recipe", "SavedEmbeddings": "saving",
    "load_embeddings": "saving",
}

__all__ = [
    "apply", "as_recipe", "ArchSpec", "register_architecture", "Embedder", "TpsurgeryError", "RecipeError",
    "InputError", "ModelError", "BackendError", "DEFAULT_MODEL", "load_model", "Plan", "Batch", "collate",
    "compile_plan", "Recipe", "dump_recipe", "load_recipe", "parse_recipe", "recipe_schema", "load_embeddings",
    "SavedEmbeddings", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tpsurgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names come from __getattr__
    from .api import apply, as_recipe
    from .arch import ArchSpec, register_architecture
    from .embedder import Embedder
    from .errors import BackendError, InputError, ModelError, RecipeError, TpsurgeryError
    from .library import load_recipe
    from .models import DEFAULT_MODEL, load_model
    from .batch import Batch, collate
    from .plan import Plan, compile_plan
    from .recipe import Recipe, dump_recipe, parse_recipe, recipe_schema
    from .saving import SavedEmbeddings, load_embeddings
