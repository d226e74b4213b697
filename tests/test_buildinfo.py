"""Issue 22.4: caches a CI guard can trust. What is read back from disk (embedding cache, stored sweeps, reused part
files) is keyed by tpsurgery's own code and the library versions, so ``tpsurgery eval`` + ``tpsurgery regress`` (the
documented CI recipe, docs/evaluation.md, embedding cache on by default) measure the installed code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tpsurgery
from tpsurgery import buildinfo
from tpsurgery.evaluation import read_results
from tpsurgery.regression import expected_from_runs
from tpsurgery.sweep_store import resolve_auto_exit
from tpsurgery.testing import tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
R = "prompt: 'This sentence : <PST> {text} means'\ntp: {start: 1, stop: 3}\nexit_layer: 3"
TEXTS = ["a b c", "hello there", "x"]


def test_other_code_or_library_versions_are_a_cache_miss(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", n_layers=4)
    emb = tpsurgery.apply(model, R, tokenizer=tok, embedding_cache=tmp_path)
    first = emb.encode(TEXTS)
    emb.encode(TEXTS)
    cache = emb.embedding_cache
    assert (cache.hits, cache.misses) == (3, 3)
    monkeypatch.setattr(buildinfo, "code_fingerprint", lambda: "0" * 16)  # an edited source file
    emb.encode(TEXTS)
    assert (cache.hits, cache.misses) == (3, 6)
    monkeypatch.undo()
    versions = {**buildinfo.library_versions(), "torch": "0.0"}  # another torch
    monkeypatch.setattr(buildinfo, "library_versions", lambda: versions)
    emb.encode(TEXTS)
    assert (cache.hits, cache.misses) == (3, 9)
    monkeypatch.undo()
    assert (emb.encode(TEXTS) == first).all() and cache.hits == 6  # the original entries are still found


def test_a_stored_sweep_from_other_code_warns_that_it_may_be_stale(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", n_layers=4)
    recipe = tpsurgery.parse_recipe(R).replace(exit_layer="auto")
    tp = recipe.tp.model_dump(mode="json")
    stored = {"rows": [{"label": "r", "tp": tp, "scores": [1.0, 3.0, 2.0, 0.0, 0.0]}], "build": buildinfo.build_info()}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(stored))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_auto_exit(model, recipe, path) == 1
    monkeypatch.setattr(buildinfo, "code_fingerprint", lambda: "0" * 16)
    with pytest.warns(UserWarning, match="other tpsurgery code or library versions.*rerun `tpsurgery sweep`"):
        assert resolve_auto_exit(model, recipe, path) == 1


@pytest.mark.skipif(not (SAMPLES / "STS").is_dir(), reason="needs ../shared/data/format-samples")
def test_regress_catches_a_regression_in_the_code_with_the_cache_on(tmp_path):
    """The issue's repro on a tiny model: ``eval sts`` (cache on, the default) -> expected scores; a regression
    introduced into a copy of the package's source (every batch's embedding gets noise added inside the backend, below
    the embedding cache); the same ``eval sts`` + ``regress`` must exit 1 (it reused the cached embeddings before)."""
    src = tmp_path / "src"
    shutil.copytree(Path(tpsurgery.__file__).parent, src / "tpsurgery", ignore=shutil.ignore_patterns("__pycache__"))
    model, tok = tiny_model("llama", n_layers=4)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "r.yaml").write_text(R + "\nname: tiny-tp\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src), "TPSURGERY_CACHE": str(tmp_path / "cache"),
           "TPSURGERY_EMBEDDING_CACHE": str(tmp_path / "embeddings")}

    def tps(*args):
        return subprocess.run([sys.executable, "-m", "tpsurgery", *args], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)  # not the checkout's folder: `-m` imports from the cwd first

    def evaluate(out):
        done = tps("eval", "sts", "-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "tiny"), "-d", str(SAMPLES),
                   "--tasks", "sts13", "--no-progress", "-o", str(tmp_path / out))
        assert done.returncode == 0, done.stderr
        return read_results(tmp_path / out)

    before = evaluate("before.json")
    (tmp_path / "expected.json").write_text(json.dumps(expected_from_runs(before, tol=0.5)))
    backend = src / "tpsurgery" / "backends" / "nnsight_backend.py"
    backend.write_text(backend.read_text() + (
        "\n\n_run = NNsightBackend.run\n\n\ndef _regressed(self, plan, batch, *args, **kwargs):  # the injected bug\n"
        "    out = _run(self, plan, batch, *args, **kwargs)\n"
        "    return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(out.shape[0])).to(out)\n\n\n"
        "NNsightBackend.run = _regressed\n"))
    after = evaluate("after.json")
    assert before[0]["scores"]["sts13"] - after[0]["scores"]["sts13"] > 1  # the bug costs points...
    done = tps("regress", str(tmp_path / "after.json"), str(tmp_path / "expected.json"))
    assert done.returncode == 1 and "regressed" in done.stdout, done.stdout + done.stderr  # ...and regress sees it
