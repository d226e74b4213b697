"""Recipe grids (``tpsurgery sweep --vary``): each variant is the recipe with exactly the named fields changed, its
sweep equals a sweep of that recipe written by hand, and ``exit_layer: auto`` of a variant finds its stored sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.data import load_stsb
from tpsurgery.errors import RecipeError
from tpsurgery.recipe import parse_recipe
from tpsurgery.sweep import run_sweep
from tpsurgery.testing import tiny_model
from tpsurgery.variants import parse_vary, set_field, variants

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
CP = """
name: cp
prompt: 'This sentence : <PST> "{text}" means in one word:"'
runs: {irrelevant: 'The irrelevant information of this sentence : "{text}" means in one word:"'}
edits:
  - {site: attn_out_in, layers: 1, rows: last, op: subtract, run: irrelevant}
  - {site: attn_out_in, layers: 1, rows: last, op: scale, factor: 2.0}
exit_layer: -2
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(0, 3), factor=st.floats(-4, 4, allow_nan=False), alpha=st.sampled_from([0.5, 1.0]))
def test_a_variant_changes_exactly_the_named_fields(layers, factor, alpha):
    base = parse_recipe(CP)
    vary = {"edits.layers": [layers], "edits.1.factor": [factor], "tp.alpha": [alpha]}
    [(label, r)] = variants(base, vary)
    assert [e.layers for e in r.edits] == [layers, layers] and r.edits[1].factor == factor and r.tp.alpha == alpha
    assert r.replace(edits=base.edits, tp=base.tp, name="", description="").hash() == base.hash()
    assert label.startswith(f"layers={layers} ")


def test_bad_fields_are_named_with_the_options():
    base = parse_recipe(CP)
    with pytest.raises(RecipeError, match=r"`edits\.5`.*out of range.*2 elements"):
        variants(base, {"edits.5.factor": [1]})
    with pytest.raises(RecipeError, match=r"`edits\.eps`.*no element of `edits` has `eps` \(they have: factor"):
        variants(base, {"edits.eps": [1e-6]})
    with pytest.raises(RecipeError, match=r"`cp`.*no section `cp` \(it has: .*edits"):
        variants(base, {"cp.factor": [1]})
    with pytest.raises(RecipeError, match=r"`edits\.0\.layers`.*greater than.*variant layers=-1"):  # the recipe's own validation, field named
        variants(base, {"edits.layers": [-1]})
    with pytest.raises(RecipeError, match="FIELD=V1,V2"):
        parse_vary(["edits.factor"])
    with pytest.raises(RecipeError, match="varied twice"):
        parse_vary(["tp.alpha=1", "tp.alpha=2"])
    assert set_field({"a": [1, 2]}, "a.-1", 5) == {"a": [1, 5]}


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
def test_cli_vary_sweeps_each_variant_like_its_own_recipe(tmp_path):
    model, tok = tiny_model("llama", n_layers=3, seed=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(CP)
    out = tmp_path / "sw"
    result = CliRunner().invoke(app, ["sweep", "-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "m"), "-d",
                                      str(SAMPLES), "--task", "stsb", "--stops", "3", "--vary", "edits.layers=0,2",
                                      "--vary", "edits.factor=0.5,3", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| layers=2 factor=3 | TP [1,3) |" in result.output and (out / "curves.png").is_file()
    found = json.loads((out / "variants.json").read_text())
    assert found["exit_layer"] == 2 and [v["label"] for v in found["variants"]] == [
        "layers=0 factor=0.5", "layers=0 factor=3", "layers=2 factor=0.5", "layers=2 factor=3"]
    pairs = load_stsb([SAMPLES], "test")
    hand = CP.replace("layers: 1", "layers: 2").replace("factor: 2.0", "factor: 3")
    want = run_sweep(model, hand, pairs, stops=[3], tokenizer=tok)
    assert found["variants"][3]["rows"] == want.rows
    assert found["variants"][2]["rows"] != want.rows  # the factor reached the engine
    # each variant's sweep is stored: exit_layer auto on the hand-written variant finds its own best exit
    auto = tpsurgery.apply(model, hand.replace("exit_layer: -2", "exit_layer: auto\ntp: {start: 1, stop: 3}"),
                           tokenizer=tok)
    best = max(range(4), key=lambda m: (want.rows[1]["scores"][m] or -1e9, -m))
    assert auto.plan.exit_layer == best


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
def test_cli_vary_with_own_schedule_sweeps_each_variants_own_schedule(tmp_path):
    model, tok = tiny_model("llama", n_layers=3, seed=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    own = CP + "tp: {spans: [{start: 0, stop: 1}, {start: 2, stop: 3}]}\n"
    (tmp_path / "r.yaml").write_text(own)
    out = tmp_path / "sw"
    result = CliRunner().invoke(app, ["sweep", "-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "m"), "-d",
                                      str(SAMPLES), "--task", "stsb", "--own-schedule", "--vary",
                                      "edits.factor=0.5,3", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    found = json.loads((out / "variants.json").read_text())
    assert [r["label"] for r in found["variants"][1]["rows"]] == ["no TP (placeholder hidden)", "recipe: TP [0,1)+[2,3)"]
    want = run_sweep(model, own.replace("factor: 2.0", "factor: 3"), load_stsb([SAMPLES], "test"), tokenizer=tok,
                     own_schedule=True)
    assert found["variants"][1]["rows"] == want.rows
