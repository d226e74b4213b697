"""Regression checks: the compare logic, the ``regress`` command's exit codes, and the project's own CI guard
(SmolLM2-135M, 200 evenly spaced pairs of STS-B dev, vs tests/golden/smollm2-stsb-dev-spread200.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.data import file_hash
from tpsurgery.evaluation import evaluate, write_results
from tpsurgery.regression import assert_no_regression, compare, expected_from_runs, failed

GOLDEN = Path(__file__).parent / "golden" / "smollm2-stsb-dev-spread200.json"
SENTEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "senteval"


def run(name, scores, h="h"):
    return {"recipe": {"name": name, "hash": h}, "scores": scores}


def test_compare_statuses():
    exp = {"tol": 0.5, "expected": {"a": {"scores": {"t1": 70.0, "t2": 60.0}}, "b": {"scores": {"t1": 50.0}}}}
    checks = compare([run("a", {"t1": 69.6, "t2": 60.6})], exp)
    assert [(c.recipe, c.task, c.status) for c in checks] == [("a", "t1", "ok"), ("a", "t2", "improved"),
                                                             ("b", "t1", "missing")]
    assert failed(checks)  # a missing run is a failure
    assert not failed(compare([run("a", {"t1": 69.6, "t2": 60.6})], {"expected": {"a": exp["expected"]["a"]}}))
    assert failed(compare([run("a", {"t1": 69.6, "t2": 60.6})], {"expected": {"a": exp["expected"]["a"]}}, strict=True))
    assert [c.status for c in compare([run("a", {"t1": 69.4, "t2": 60.0})], exp, tol=0.5)][0] == "regressed"
    assert [c.status for c in compare([run("a", {"t1": 69.4, "t2": 60.0})], exp, tol=1.0)][0] == "ok"
    pinned = {"expected": {"a": {"scores": {"t1": 70.0}, "recipe_hash": "other"}}}
    assert [c.status for c in compare([run("a", {"t1": 70.0})], pinned)] == ["mismatch", "ok"]
    assert [c.status for c in compare([run("x", {"t1": float("nan")})], {"expected": {"x": {"scores": {"t1": 1.0}}}})] \
        == ["missing"]


def test_regress_command_exit_codes(tmp_path):
    results = write_results(tmp_path / "r.json", [run("a", {"stsb-dev": 72.0})])
    exp = tmp_path / "e.json"
    exp.write_text(json.dumps(expected_from_runs([run("a", {"stsb-dev": 72.3})], tol=0.5)))
    cli = CliRunner()
    ok = cli.invoke(app, ["regress", str(results), str(exp)])
    assert ok.exit_code == 0 and "ok" in ok.output
    bad = cli.invoke(app, ["regress", str(results), str(exp), "--tol", "0.1"])
    assert bad.exit_code == 1 and "regressed" in bad.output
    exp.write_text(json.dumps(expected_from_runs([run("a", {"stsb-dev": 71.0})], tol=0.5)))
    assert cli.invoke(app, ["regress", str(results), str(exp)]).exit_code == 0  # improvement: warn only
    assert cli.invoke(app, ["regress", str(results), str(exp), "--strict"]).exit_code == 1
    with pytest.raises(AssertionError, match="regressed"):
        assert_no_regression(results, {"expected": {"a": {"scores": {"stsb-dev": 80.0}}}})


@pytest.mark.skipif(not SENTEVAL.is_dir(), reason=f"{SENTEVAL} is not present")
def test_smollm2_stsb_dev_subset_matches_golden(smollm2, tmp_path):
    """The project's CI guard: the four shipped SmolLM2 recipes (PromptEOL, + TP, + CP, + TP + CP) on 200 evenly
    spaced pairs, all six genre/source sub-sets (~2 min on 2 cores).

    Strict (a rise beyond tol also fails: the golden numbers are this implementation's own). PromptEOL and + TP differ
    by 2.4 points here, each CP recipe from its CP-less twin by >= 0.56 and neighbouring exit layers by >= 0.87, so a
    silently dropped TP schedule or CP edit or a shifted exit layer fails the check.
    """
    golden = json.loads(GOLDEN.read_text())
    model, tok = smollm2
    runs = [evaluate(tpsurgery.apply(model, name, tokenizer=tok), ["stsb-dev"], [SENTEVAL], limit=200, spread=True,
                     model_name="smollm2-135m") for name in golden["expected"]]
    assert runs[0]["data"]["stsb-dev"]["spread"] is True
    assert [file_hash(Path(p)) for p in runs[0]["data"]["stsb-dev"]["files"]] == \
        list(golden["data"]["stsb-dev"]["files"].values())  # the same data file
    write_results(tmp_path / "results.json", runs)
    assert_no_regression(tmp_path / "results.json", GOLDEN, strict=True)
