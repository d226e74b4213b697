"""Reliability 3 (issue 23): no number that looks right and isn't, no file destroyed, every usage error one line.

Each test here failed before its fix (see docs/reliability.md). Real tiny models, the real CLI, real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.data import load_stsb
from tpsurgery.evaluation import evaluate_sts
from tpsurgery.testing import tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
PROMPT = "prompt: 'This sentence : <PST> \"{text}\" means in one word:\"'\n"
REC = {"prompt": 'This sentence : <PST> "{text}" means in one word:"', "tp": {"start": 0, "stop": 2}, "exit_layer": 3}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved to disk and a recipe file."""
    folder = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model("llama")
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "r.yaml").write_text(json.dumps(REC), encoding="utf-8")
    return folder, model, tok


def _embed_args(saved, inp, out, *more):
    folder = saved[0]
    return ["embed", "-i", str(inp), "-o", str(out), "-r", str(folder / "r.yaml"), "-m", str(folder / "model"),
            "--no-progress", *more]


def _cli(*args, stdin=None, env=None, timeout=300):
    """The installed entry point's behaviour (``tpsurgery.cli.main``) in a subprocess: exit code and stderr."""
    return subprocess.run([sys.executable, "-c", "from tpsurgery.cli import main; main()", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------- 1. best.yaml = the best cell
@needs_samples
@pytest.mark.parametrize("family,seed", [("qwen2", 5), ("llama", 3)])
def test_best_yaml_recreates_every_cell_and_the_best_exactly(family, seed, tmp_path):
    """best.yaml said `no TP (placeholder hidden)` but kept the visible placeholder (39.14 instead of 70.52)."""
    from tpsurgery.sweep import run_sweep, write_outputs

    model, tok = tiny_model(family, n_layers=3, seed=seed)
    pairs = load_stsb([SAMPLES], "test")
    res = run_sweep(model, PROMPT, pairs, stops=[2], starts=[1], tokenizer=tok, progress=False)
    for r, row in enumerate(res.rows):  # every cell, the baseline row included
        for m, want in enumerate(row["scores"]):
            got = evaluate_sts(tpsurgery.apply(model, res.row_recipe(r, m), tokenizer=tok), [pairs])[pairs.name]
            if want is None:
                assert np.isnan(got)
            else:
                assert got == pytest.approx(want, abs=1e-6), (row["label"], m)
    base = 0  # force the baseline row to be the best: its recipe must hide the placeholder
    res.rows[base]["scores"] = [None] + [100.0] * (len(res.rows[base]["scores"]) - 1)
    best = tpsurgery.load_recipe(write_outputs(res, tmp_path / "out")["best"])
    assert best.placeholder.mask == "all" and best.tp.empty and best.exit_layer == 1


# --------------------------------------------------------------- 5. stored sweeps keyed by data; sample size shown
@needs_samples
def test_a_limited_sweep_never_replaces_the_full_data_sweep_that_auto_reads(tmp_path):
    from tpsurgery.sweep import run_sweep
    from tpsurgery.sweep_store import resolve_auto_exit

    model, tok = tiny_model("qwen2", n_layers=4, seed=5)
    pairs = load_stsb([SAMPLES], "test")
    few = load_stsb([SAMPLES], "test", limit=3)
    full = run_sweep(model, PROMPT, pairs, stops=[2, 3], tokenizer=tok, progress=False)
    full.store()
    recipe = tpsurgery.parse_recipe(PROMPT).replace(tp=full.rows[1]["tp"], exit_layer="auto")
    want = resolve_auto_exit(model, recipe)
    small = run_sweep(model, PROMPT, few, stops=[2, 3], tokenizer=tok, progress=False)
    small.rows[1]["scores"] = [None] * (len(small.rows[1]["scores"]) - 1) + [99.0]  # a different best exit
    p = small.store()
    assert p != full.store() and json.loads(p.read_text())["n_pairs"] == 3
    assert resolve_auto_exit(model, recipe) == want  # the full-data sweep still decides


@needs_samples
def test_heatmap_and_variant_outputs_say_how_many_pairs(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tpsurgery.sweep import run_sweep
    from tpsurgery.variants import parse_vary, run_variants

    titles = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (titles.extend(
        ax.get_title() for ax in self.axes), real(self, *a, **k))[1])
    model, tok = tiny_model("qwen2", n_layers=3, seed=5)
    pairs = load_stsb([SAMPLES], "test")
    res = run_sweep(model, PROMPT, pairs, stops=[2], tokenizer=tok, progress=False)
    res.heatmap(tmp_path / "h.png")
    found = run_variants(model, tpsurgery.parse_recipe(PROMPT), parse_vary(["tp.alpha=0.5,1"]), pairs, stops=[2],
                         tokenizer=tok, progress=False)
    paths = found.write(tmp_path / "v")
    n = f"{len(pairs)} pairs"
    assert titles and all(n in t for t in titles if t), titles
    assert n in paths["table"].read_text()
    # --vary writes the best cell of all variants and a best.yaml that recreates it
    best = tpsurgery.load_recipe(paths["best"])
    top = max((s for res in found.sweeps for row in res.rows for s in row["scores"] if s is not None))
    got = evaluate_sts(tpsurgery.apply(model, best, tokenizer=tok), [pairs])[pairs.name]
    assert got == pytest.approx(top, abs=1e-6)
