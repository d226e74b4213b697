"""The shipped recipe library: the top-level ``recipes/*.yaml`` of the source tree (browse and copy them there),
installed into the wheel as ``tpsurgery/recipes/`` (package data; pyproject maps ``tpsurgery.recipes`` to
``recipes/``), so a recipe loads by name from any folder: ``tpsurgery.load_recipe("smollm2-prompteol-tp")``.

>>> "prompteol-tp" in [name for name, _ in list_recipes()]
True
>>> find_recipe("recipes/prompteol-tp.yaml") == find_recipe("prompteol-tp") == RECIPE_DIR / "prompteol-tp.yaml"
True
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path, PurePath

from .errors import RecipeError
from .recipe import Recipe, parse_recipe, read_recipe



def _recipe_dir() -> Path:
    """``tpsurgery/recipes`` in an installed wheel, else ``recipes/`` beside the package (a source checkout, an
    editable install, ``PYTHONPATH``): one copy of the library in git, found by path, never by import.

    >>> _recipe_dir().name, (_recipe_dir() / "echo.yaml").is_file()
    ('recipes', True)
    """
    package = Path(__file__).resolve().parent
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


RECIPE_DIR = _recipe_dir()


def list_recipes() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every shipped recipe, sorted by name."""
    out = []
    for p in sorted(RECIPE_DIR.glob("*.yaml"), key=lambda q: q.stem):
        out.append((p.stem, parse_recipe(p.read_text(encoding="utf-8"), base=p.parent).description.strip().splitlines()[0:1] or [""]))
    return [(name, desc[0]) for name, desc in out]


def shipped_name(name: str) -> str | None:
    """The shipped-recipe name a reference means: ``NAME``, ``NAME.yaml`` or ``recipes/NAME.yaml`` (the library's
    folder in a source checkout before it moved into the package); None for any other path.

    >>> shipped_name("recipes/echo.yaml"), shipped_name("echo"), shipped_name("my/dir/echo.yaml")
    ('echo', 'echo', None)
    """
    p = PurePath(name.replace("\\", "/"))
    if len(p.parts) > 2 or (len(p.parts) == 2 and p.parts[0] != "recipes") or p.suffix not in ("", ".yaml"):
        return None
    return p.name.removesuffix(".yaml")


def is_path_like(name: str) -> bool:
    """A file name rather than a recipe name: it has a folder separator or a recipe file's suffix.

    >>> is_path_like("recipes/nothere.yaml"), is_path_like("mine.yml"), is_path_like("prompteol-tp")
    (True, True, False)
    """
    return "/" in name or "\\" in name or PurePath(name).suffix.lower() in (".yaml", ".yml", ".json")


def find_recipe(name: str) -> Path:
    """Path of a shipped recipe by name (or ``recipes/NAME.yaml``). The error for a path that is no file and no
    shipped recipe says "file not found"; for a name it lists the shipped names.

    >>> find_recipe("recipes/nothere.yaml")
    Traceback (most recent call last):
    ...
    tpsurgery.errors.RecipeError: recipe field `<recipe>`: file not found: recipes/nothere.yaml
    """
    stem = shipped_name(name)
    p = RECIPE_DIR / f"{stem}.yaml" if stem else None
    if p is not None and p.is_file():
        return p
    names = [q.stem for q in sorted(RECIPE_DIR.glob("*.yaml"))]
    close = difflib.get_close_matches(stem or PurePath(name).stem, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    if is_path_like(name):
        meant = f"; did you mean the shipped {' or '.join(map(repr, close))}?" if close else ""
        raise RecipeError("<recipe>", f"file not found: {name}{meant}")
    raise RecipeError("<recipe>", f"no recipe file or shipped recipe named {name!r}{hint} (shipped: {', '.join(names)})")


def _is_recipe_text(source: str) -> bool:
    """YAML/JSON text rather than a file name: a line break, a leading ``{``, or ``key: value`` (no such file).

    >>> _is_recipe_text("exit_layer: 3"), _is_recipe_text("recipes/echo.yaml"), _is_recipe_text("C:/r.yaml")
    (True, False, False)
    """
    if "\n" in source or source.lstrip().startswith("{"):
        return True
    return re.search(r":\s", source) is not None and not Path(source).exists()


def load_recipe(source: str | Path) -> Recipe:
    """A recipe from a YAML (or JSON) file (:func:`~tpsurgery.recipe.read_recipe`), a shipped recipe by name
    (``tpsurgery recipes list``; also ``recipes/NAME.yaml``) when no such file exists, or YAML text.

    >>> load_recipe("smollm2-prompteol-tp").name, load_recipe("exit_layer: 3").exit_layer
    ('smollm2-prompteol-tp', 3)
    """
    if isinstance(source, str) and _is_recipe_text(source):
        return parse_recipe(source)
    p = Path(source)
    return read_recipe(p if p.exists() else find_recipe(str(source)))
