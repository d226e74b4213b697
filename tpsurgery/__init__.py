"""tpsurgery: training-free surgery (Token Prepending and friends) that turns decoder LLMs into sentence embedders.

>>> import tpsurgery
>>> recipe = tpsurgery.load_recipe("smollm2-prompteol-tp")
>>> recipe.tp.spans[0].start, recipe.exit_layer
(1, -3)
"""

from ._version import __version__
from .api import apply, as_recipe
from .arch import ArchSpec, register_architecture
from .embedder import Embedder
from .errors import BackendError, InputError, ModelError, RecipeError, TpsurgeryError
from .library import load_recipe
from .models import DEFAULT_MODEL, load_model
from .plan import Batch, Plan, collate, compile_plan
from .recipe import Recipe, dump_recipe, parse_recipe, recipe_schema
from .saving import SavedEmbeddings, load_embeddings

__all__ = [
    "apply", "as_recipe", "ArchSpec", "register_architecture", "Embedder", "TpsurgeryError", "RecipeError",
    "InputError", "ModelError", "BackendError", "DEFAULT_MODEL", "load_model", "Plan", "Batch", "collate",
    "compile_plan", "Recipe", "dump_recipe", "load_recipe", "parse_recipe", "recipe_schema", "load_embeddings",
    "SavedEmbeddings",
]
