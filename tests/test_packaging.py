"""The built wheel is a working library on its own: the recipes (the top-level ``recipes/``, the one copy in git)
ship as the package data folder ``tpsurgery/recipes/`` and load by name from any folder, outside the source tree
(issues 14, 24). Offline: the wheel is built without build isolation (setuptools is in
the ``test`` extra) from a copy of the sources, and installed with ``pip --target`` into a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tpsurgery.library import RECIPE_DIR

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, tpsurgery
from pathlib import Path
from tpsurgery.library import list_recipes
assert Path(tpsurgery.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), tpsurgery.__file__
r = tpsurgery.load_recipe("smollm2-prompteol-tp")
assert r == tpsurgery.load_recipe("recipes/smollm2-prompteol-tp.yaml"), "the README's path form"
print(len(list_recipes()), r.name)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", minversion="77")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tpsurgery", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (whl,) = (tmp / "dist").glob("tpsurgery-*.whl")
    return whl


def test_wheel_ships_every_recipe_and_an_spdx_licence(wheel):
    with zipfile.ZipFile(wheel) as z:
        shipped = {Path(n).name for n in z.namelist() if n.startswith("tpsurgery/recipes/") and n.endswith(".yaml")}
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert shipped == {p.name for p in RECIPE_DIR.glob("*.yaml")} and len(shipped) > 40
    assert "License-Expression: MIT" in meta


def test_recipes_live_once_in_the_top_level_folder():
    assert RECIPE_DIR == ROOT / "recipes" and not (ROOT / "tpsurgery" / "recipes").exists()
    assert not any(p.is_symlink() for p in [RECIPE_DIR, *RECIPE_DIR.iterdir()])


def test_wheel_holds_every_module_of_the_source_tree(wheel):
    """pyproject lists the packages by hand (the recipes' package-dir mapping needs it): a new subpackage missing
    from that list fails here, not in a user's install."""
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / "tpsurgery").rglob("*.py")}


def test_sdist_carries_the_recipes(tmp_path):
    """A wheel built from the sdist (what pip does with a source download) has the recipes too."""
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path / "src"
    for name in ("tpsurgery", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"],
                         cwd=src, capture_output=True, text=True, check=True)
    import tarfile

    with tarfile.open(src / "dist" / out.stdout.split()[-1]) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if n.endswith(".yaml")}
    assert names == {f"recipes/{p.name}" for p in RECIPE_DIR.glob("*.yaml")}


def test_installed_wheel_loads_recipes_by_name_from_any_folder(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=elsewhere, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(list(RECIPE_DIR.glob("*.yaml")))), "smollm2-prompteol-tp"]
