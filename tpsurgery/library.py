"""The shipped recipe library (``recipes/*.yaml``), and recipes loaded by file path or shipped name.

>>> "prompteol-tp" in [name for name, _ in list_recipes()]
True
>>> load_recipe("prompteol-tp") == load_recipe("recipes/prompteol-tp.yaml")
True
"""

from __future__ import annotations

from pathlib import Path

from .errors import RecipeError
from .recipe import Recipe, parse_recipe, read_recipe

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every shipped recipe, sorted by name."""
    out = []
    for p in sorted(RECIPE_DIR.glob("*.yaml"), key=lambda q: q.stem):
        out.append((p.stem, parse_recipe(p.read_text(encoding="utf-8")).description.strip().splitlines()[0:1] or [""]))
    return [(name, desc[0]) for name, desc in out]


def find_recipe(name: str) -> Path:
    """Path of a shipped recipe by name; the error lists the shipped names."""
    p = RECIPE_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if p.exists():
        return p
    names = ", ".join(p.stem for p in sorted(RECIPE_DIR.glob("*.yaml")))
    raise RecipeError("<recipe>", f"no recipe file or shipped recipe named {name!r}; shipped: {names}")


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a YAML (or JSON) file (:func:`~tpsurgery.recipe.read_recipe`), or a shipped recipe by name
    (``tpsurgery recipes list``) when no such file exists."""
    p = Path(path)
    return read_recipe(p if p.exists() else find_recipe(str(path)))
