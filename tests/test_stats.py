"""Bootstrap intervals and paired differences (tpsurgery.stats), the results JSON's pairs, `compare` and
`regress --interval`.

Oracles: scipy's spearmanr on explicitly resampled pairs (same indices), numpy percentiles, and the scores the
evaluator reports; never the module's own helpers for the expected values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import spearmanr
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.errors import InputError
from tpsurgery.evaluation import evaluate, load_task, write_results
from tpsurgery.stats import (RESAMPLES, bootstrap, compare_runs, interval, paired_difference, resample_indices,
                             uncertainty)
from tpsurgery.testing import tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
needs_data = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared data samples are not present")
PROMPT = "prompt: 'This sentence : \"{text}\" means in one word:\"'\nexit_layer: 3"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5)), min_size=3, max_size=30), st.integers(0, 50))
def test_every_replicate_is_scipys_spearman_on_the_resampled_pairs(pairs, seed):
    pred, gold = np.array(pairs, dtype=float).T  # small integer ranges: many ties
    reps = bootstrap(pred, gold, "t", resamples=20, seed=seed)
    for b, idx in enumerate(resample_indices("t", len(pred), 20, seed)):
        want = 100 * spearmanr(pred[idx], gold[idx]).statistic
        assert (np.isnan(want) and np.isnan(reps[b])) or abs(reps[b] - want) < 1e-9


def test_interval_is_the_percentile_interval_and_narrows_with_more_pairs():
    rng = np.random.default_rng(5)
    gold = rng.uniform(0, 5, 1600)
    pred = gold + rng.normal(0, 2, 1600)
    reps = bootstrap(pred, gold, "t")
    assert interval(reps) == tuple(round(float(x), 4) for x in np.percentile(reps, [2.5, 97.5]))
    small = interval(bootstrap(pred[:100], gold[:100], "t"))
    big = interval(reps)
    assert big[1] - big[0] < 0.5 * (small[1] - small[0])
    score = 100 * spearmanr(pred, gold).statistic
    assert big[0] < score < big[1]


def test_paired_difference_is_tighter_than_the_two_intervals_and_zero_for_equal_predictions():
    rng = np.random.default_rng(6)
    gold = rng.uniform(0, 5, 300)
    a = gold + rng.normal(0, 2, 300)
    b = a + rng.normal(0, 0.3, 300)
    d = paired_difference(a, b, gold, "t")
    assert abs(d["diff"] - 100 * (spearmanr(b, gold).statistic - spearmanr(a, gold).statistic)) < 1e-3
    ia, ib = interval(bootstrap(a, gold, "t")), interval(bootstrap(b, gold, "t"))
    assert d["interval"][1] - d["interval"][0] < 0.5 * min(ia[1] - ia[0], ib[1] - ib[0])
    same = paired_difference(a, a, gold, "t")
    assert same["diff"] == 0 and same["interval"] == [0.0, 0.0]


def test_average_interval_uses_the_same_replicate_of_every_task():
    rng = np.random.default_rng(7)
    pairs = {}
    for t, n in (("x", 80), ("y", 120)):
        gold = rng.uniform(0, 5, n)
        pairs[t] = {"gold": gold.tolist(), "cosine": (gold + rng.normal(0, 1, n)).tolist()}
    u = uncertainty(pairs, resamples=200)
    reps = [bootstrap(p["cosine"], p["gold"], t, 200) for t, p in pairs.items()]
    assert u["average"]["interval"] == list(interval((reps[0] + reps[1]) / 2))
    one = uncertainty({"x": pairs["x"]}, resamples=200)
    assert one["average"]["interval"] == one["tasks"]["x"]["interval"]
    assert u["resamples"] == 200 and uncertainty({"x": pairs["x"]})["resamples"] == RESAMPLES


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    model, tok = tiny_model("llama", n_layers=4, seed=3)
    dirs = [SAMPLES]
    runs = [evaluate(tpsurgery.apply(model, r, tokenizer=tok), ["sts13", "stsb"], dirs, model_name="tiny")
            for r in (PROMPT, PROMPT.replace("exit_layer: 3", "exit_layer: 2"))]
    out = tmp_path_factory.mktemp("runs")
    paths = [write_results(out / f"{i}.json", [r]) for i, r in enumerate(runs)]
    return runs, paths


@needs_data
def test_results_keep_pairs_that_reproduce_the_scores(two_runs):
    runs, _ = two_runs
    run = runs[0]
    for task in ("sts13", "stsb"):
        p, data = run["pairs"][task], load_task(task, [SAMPLES])
        assert p["gold"] == [float(g) for g in data.gold] and p["n"] == len(data)
        assert abs(100 * spearmanr(p["cosine"], p["gold"]).statistic - run["scores"][task]) < 1e-3
        lo, hi = run["uncertainty"]["tasks"][task]["interval"]
        assert lo < run["scores"][task] < hi
    lo, hi = run["uncertainty"]["average"]["interval"]
    assert lo < np.mean(list(run["scores"].values())) < hi


@needs_data
def test_compare_command_gives_the_paired_difference_per_task(two_runs, tmp_path):
    runs, paths = two_runs
    res = CliRunner().invoke(app, ["compare", str(paths[0]), str(paths[1]), "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["sts13", "stsb", "average"]
    for r in rows[:2]:
        assert abs(r["diff"] - (runs[1]["scores"][r["task"]] - runs[0]["scores"][r["task"]])) < 1e-3
        assert r["interval"][0] <= r["diff"] <= r["interval"][1]
    assert "| sts13 |" in res.output and "B - A" in res.output


@needs_data
def test_compare_refuses_runs_on_different_pairs_or_without_pairs(two_runs):
    runs, _ = two_runs
    a, b = runs
    moved = json.loads(json.dumps(b))
    moved["pairs"]["stsb"]["sha256"] = "0" * 16
    with pytest.raises(InputError, match="task 'stsb': the two runs were scored on different pairs"):
        compare_runs(a, moved)
    bare = {k: v for k, v in a.items() if k != "pairs"}
    with pytest.raises(InputError, match="keeps no per-pair cosines"):
        compare_runs(bare, b)


@needs_data
def test_compare_command_needs_a_run_name_when_a_file_has_several(two_runs, tmp_path):
    runs, _ = two_runs
    both = write_results(tmp_path / "both.json", [{**runs[0], "recipe": {**runs[0]["recipe"], "name": "x"}},
                                                  {**runs[1], "recipe": {**runs[1]["recipe"], "name": "y"}}])
    res = CliRunner().invoke(app, ["compare", str(both), str(both)])
    assert res.exit_code != 0 and "choose one with --a/--b: x, y" in str(res.exception)
    ok = CliRunner().invoke(app, ["compare", str(both), str(both), "--a", "x", "--b", "y"])
    assert ok.exit_code == 0, ok.output


@needs_data
def test_regress_interval_takes_the_tolerance_from_the_interval(two_runs, tmp_path):
    runs, paths = two_runs
    run = runs[0]
    lo, hi = run["uncertainty"]["tasks"]["stsb"]["interval"]
    name = run["recipe"]["hash"]
    for want, code in ((hi - 0.01, 0), (hi + 0.01, 1)):
        exp = tmp_path / "exp.json"
        exp.write_text(json.dumps({"tol": 0.0, "expected": {name: {"scores": {"stsb": want}}}}))
        assert CliRunner().invoke(app, ["regress", str(paths[0]), str(exp), "--interval"]).exit_code == code
        assert CliRunner().invoke(app, ["regress", str(paths[0]), str(exp)]).exit_code == (want > run["scores"]["stsb"])
