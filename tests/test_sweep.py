"""Sweeps: every exit layer from one pass equals separate runs; outputs; ``exit_layer: auto`` from the stored sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.data import load_stsb
from tpsurgery.errors import RecipeError
from tpsurgery.evaluation import evaluate_sts
from tpsurgery.cache import model_fingerprint
from tpsurgery.sweep import SweepResult, run_sweep, write_outputs
from tpsurgery.sweep_store import resolve_auto_exit, sweep_path
from tpsurgery.testing import tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
PROMPT = "prompt: 'This sentence : <PST> \"{text}\" means in one word:\"'\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("qwen2", n_layers=4, seed=5)
    pairs = load_stsb([SAMPLES], "test")
    res = run_sweep(model, PROMPT + "exit_layer: 2", pairs, stops=[2, 3], starts=[0, 1], tokenizer=tok,
                    model_name="tiny-qwen2")
    return model, tok, pairs, res


def test_one_pass_per_row_equals_separate_runs(setup):
    model, tok, pairs, res = setup
    assert [r["label"] for r in res.rows] == ["no TP (placeholder hidden)", "TP [0,2)", "TP [0,3)", "TP [1,2)",
                                              "TP [1,3)"]
    for row in res.rows:
        assert len(row["scores"]) == 5  # hidden_states[0..4] of a 4-layer model
        for m in (1, 3, 4):
            recipe = tpsurgery.parse_recipe(PROMPT).replace(tp=row["tp"], exit_layer=m)
            if row.get("placeholder_mask") == "all":
                recipe = recipe.replace(placeholder={"mask": "all"})
            alone = evaluate_sts(tpsurgery.apply(model, recipe, tokenizer=tok), [pairs])[pairs.name]
            assert row["scores"][m] == pytest.approx(alone, abs=1e-3), (row["label"], m)


def test_best_is_labelled(setup):
    res = setup[3]
    rows = [{"label": "no TP", "tp": {}, "scores": [None, 1.0, 2.0]},
            {"label": "TP [1,2)", "tp": {"start": 1, "stop": 2}, "scores": [None, 3.0, 2.5]}]
    b = SweepResult("m", "fp", res.recipe, "stsb-dev", 10, 2, rows).best()
    assert (b.label, b.exit_layer, b.score, b.row, b.tp) == ("TP [1,2)", 1, 3.0, 1, {"start": 1, "stop": 2})
    assert str(b) == "TP [1,2), exit hidden_states[1] -> 3.00"
    assert res.curve(res.best().label)[res.best().exit_layer] == res.best().score


def test_own_schedule_sweep_of_several_spans_and_resume_equals_runs_at_each_exit_layer():
    """TP resumed at R runs 'up to the exit': reading every M from the pass to the end is what exit_layer: M runs."""
    model, tok = tiny_model("llama", n_layers=6, seed=2)
    pairs = load_stsb([SAMPLES], "test")
    recipe = tpsurgery.parse_recipe(PROMPT + "tp: {spans: [{start: 0, stop: 1}, {start: 2, stop: 3}], resume: 4}")
    res = run_sweep(model, recipe, pairs, own_schedule=True, tokenizer=tok)
    assert [r["label"] for r in res.rows] == ["no TP (placeholder hidden)", "recipe: TP [0,1)+[2,3) resume 4"]
    assert res.rows[1]["tp"] == recipe.tp.model_dump(mode="json")
    own = res.curve("recipe: TP [0,1)+[2,3) resume 4")
    assert own != res.curve("no TP (placeholder hidden)")
    for m in (1, 3, 5, 6):
        alone = evaluate_sts(tpsurgery.apply(model, recipe.replace(exit_layer=m), tokenizer=tok), [pairs])[pairs.name]
        assert own[m] == pytest.approx(alone, abs=1e-3), m


def test_rows_differ_where_tp_acts_and_agree_where_it_cannot(setup):
    _, _, _, res = setup
    s = {r["label"]: np.array(r["scores"], dtype=float) for r in res.rows}
    np.testing.assert_allclose(s["TP [1,2)"][1:3], s["TP [1,3)"][1:3])  # TP before layer 2 cannot change M <= 2
    np.testing.assert_allclose(s["TP [0,2)"][0:1], s["TP [1,3)"][0:1])  # hidden_states[0]: no layer has run
    assert not np.allclose(s["TP [1,3)"][3:], s["TP [1,2)"][3:])


def test_outputs_and_best_recipe(setup, tmp_path):
    _, _, _, res = setup
    paths = write_outputs(res, tmp_path / "out")
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["heatmap"].stat().st_size > 2000
    stored = json.loads(paths["json"].read_text())
    grid = np.array([r["scores"] for r in stored["rows"]], dtype=float)
    r, m = np.unravel_index(np.nanargmax(grid), grid.shape)
    assert (stored["best"]["row"], stored["best"]["exit_layer"]) == (r, m)
    assert stored["best"]["score"] == pytest.approx(np.nanmax(grid))
    best = tpsurgery.load_recipe(paths["best"])
    assert best.exit_layer == m and best.tp == tpsurgery.parse_recipe({"prompt": best.prompt, "tp": stored["rows"][r]["tp"]}).tp
    assert paths["cache"] == sweep_path(res.fingerprint, res.recipe, res.task, res.data) and paths["cache"].is_file()


def test_exit_layer_auto_uses_the_stored_row(setup):
    model, tok, _, res = setup
    res.store()
    for row in res.rows:
        recipe = tpsurgery.parse_recipe(PROMPT).replace(tp=row["tp"], exit_layer="auto")
        if row.get("placeholder_mask") == "all":  # the baseline row stands for the prompt without marker
            with pytest.raises(RecipeError, match="no row for tp"):
                resolve_auto_exit(model, recipe)
            continue
        want = int(np.nanargmax(np.array(row["scores"], dtype=float)))
        assert tpsurgery.apply(model, recipe, tokenizer=tok).plan.exit_layer == want
        assert resolve_auto_exit(model, recipe) == want


def test_exit_layer_auto_errors_name_the_field(setup):
    model, tok, _, res = setup
    res.store()
    other, _ = tiny_model("qwen2", n_layers=4, seed=6)  # same shape, other weights: other fingerprint
    assert model_fingerprint(other) != res.fingerprint
    auto = PROMPT + "tp: {start: 1, stop: 2}\nexit_layer: auto"
    with pytest.raises(RecipeError, match="exit_layer.*'auto' needs a stored sweep.*tpsurgery sweep"):
        tpsurgery.apply(other, auto, tokenizer=tok)
    with pytest.raises(RecipeError, match="exit_layer.*no row for tp"):
        tpsurgery.apply(model, PROMPT + "tp: {start: 2, stop: 4}\nexit_layer: auto", tokenizer=tok)
    with pytest.raises(RecipeError, match="needs a stored sweep"):  # another prompt is another sweep
        tpsurgery.apply(model, "prompt: '<PST> {text}'\ntp: {start: 1, stop: 2}\nexit_layer: auto", tokenizer=tok)


def test_sweep_without_placeholder_has_one_row():
    model, tok = tiny_model("llama", n_layers=2, seed=1)
    res = run_sweep(model, "prompt: 'This : {text} means'", load_stsb([SAMPLES], "test", limit=8), tokenizer=tok)
    assert [r["label"] for r in res.rows] == ["no TP"] and len(res.rows[0]["scores"]) == 3


def test_cli_sweep_writes_outputs(tmp_path):
    model, tok = tiny_model("llama", n_layers=3, seed=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(PROMPT + "exit_layer: -1\nname: mine\n")
    out = tmp_path / "sw"
    result = CliRunner().invoke(app, ["sweep", "-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "m"), "-d",
                                      str(SAMPLES), "--task", "stsb", "--stops", "2-3", "--no-baseline", "-o", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "best: TP [1," in result.output and (out / "heatmap.png").is_file()
    assert "2 rows, 4 of 6 layer forwards per batch" in result.output  # TP [1,3) resumes at layer 2
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["name"] == "mine-swept" and best["tp"]["spans"][0]["start"] == 1
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 2
