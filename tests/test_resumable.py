"""Long evaluations keep their work (tpsurgery.resumable) and `--spread-by gold` (tpsurgery.data.spread)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tpsurgery
from tpsurgery import data as D
from tpsurgery.cli import app
from tpsurgery.evaluation import read_results
from tpsurgery.resumable import evaluate_into
from tpsurgery.testing import tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared data samples are not present")
RECIPE = "prompt: 'This sentence : \"{text}\" means in one word:\"'\nexit_layer: 2"


class Counting(tpsurgery.Embedder):
    """The real Embedder, recording how many texts each encode call embeds."""

    def __init__(self, emb):
        super().__init__(emb.model, emb.tokenizer, emb.recipe, emb.backend, emb.spec)
        self.calls: list[int] = []

    def encode(self, sentences, **kw):
        self.calls.append(len(sentences))
        return super().encode(sentences, **kw)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama", n_layers=3, seed=2)
    return model, tok


def emb_for(tiny, recipe=RECIPE):
    return Counting(tpsurgery.apply(tiny[0], recipe, tokenizer=tiny[1]))


def test_a_killed_run_keeps_its_finished_tasks_and_the_rerun_skips_them(tiny, tmp_path):
    out = tmp_path / "r.json"
    emb = emb_for(tiny)
    with pytest.raises(D.DataNotFound):  # the second task fails like a killed run (no CR data): the first is on disk
        evaluate_into(out, emb, ["sts13", "cr"], [SAMPLES], model_name="m", limit=8)
    assert list(read_results(out)[0]["scores"]) == ["sts13"]
    first = read_results(out)[0]["scores"]["sts13"]
    again = emb_for(tiny)
    run, skipped = evaluate_into(out, again, ["sts13", "sts15"], [SAMPLES], model_name="m", limit=8)
    assert skipped == ["sts13"] and run["scores"]["sts13"] == first and len(again.calls) == 1
    assert set(run["pairs"]) == {"sts13", "sts15"} and set(run["uncertainty"]["tasks"]) == {"sts13", "sts15"}
    fresh = evaluate_into(tmp_path / "fresh.json", emb_for(tiny), ["sts13", "sts15"], [SAMPLES], model_name="m",
                          limit=8)[0]
    assert fresh["scores"] == run["scores"] and fresh["uncertainty"] == run["uncertainty"]


@pytest.mark.parametrize("change", ["recipe", "limit", "spread", "model", "data"])
def test_nothing_is_skipped_when_the_key_or_the_data_differ(tiny, tmp_path, change):
    data = tmp_path / "data"
    shutil.copytree(SAMPLES / "STS" / "STS13-en-test", data / "STS" / "STS13-en-test")
    out = tmp_path / "r.json"
    evaluate_into(out, emb_for(tiny), ["sts13"], [data], model_name="m", limit=8)
    kw = dict(model_name="m", limit=8)
    recipe = RECIPE
    if change == "recipe":
        recipe = RECIPE.replace("exit_layer: 2", "exit_layer: 1")
    elif change == "limit":
        kw["limit"] = 7
    elif change == "spread":
        kw["spread"] = "gold"
    elif change == "model":
        kw["model_name"] = "other"
    else:
        gs = data / "STS" / "STS13-en-test" / "STS.gs.FNWN.txt"
        gs.write_text("1.7" + gs.read_text()[3:])  # the first gold score (0.6) changes
    emb = emb_for(tiny, recipe)
    run, skipped = evaluate_into(out, emb, ["sts13"], [data], **kw)
    assert skipped == [] and emb.calls
    assert len(read_results(out)) == (1 if change == "data" else 2)  # another key: the first run is kept beside it


def test_cli_eval_writes_as_it_goes_and_a_rerun_reports_the_kept_tasks(tmp_path):
    model, tok = tiny_model("llama", n_layers=3, seed=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["eval", "sts", "-r", "smollm2-prompteol", "-m", str(tmp_path / "m"), "-d", str(SAMPLES), "--tasks",
            "sts13,sts15", "--limit", "6", "-o", str(tmp_path / "r.json"), "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "sts13: kept from" in second.output and "sts15: kept from" in second.output
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["scores"] == read_results(tmp_path / "r.json")[0]["scores"]
    third = CliRunner().invoke(app, [*args, "--no-resume"])  # recomputes every task
    assert third.exit_code == 0 and "kept from" not in third.output, third.output


def test_spread_by_gold_takes_evenly_spaced_quantiles_in_file_order():
    full = D.load_sts_year([SAMPLES], "sts15")
    k = 9
    got = D.spread(full, k, by="gold")
    ranked = sorted(range(len(full)), key=lambda i: (full.gold[i], i))  # stable: ties in file order
    want = sorted({ranked[int(round(j * (len(full) - 1) / (k - 1)))] for j in range(k)})
    assert got.a == tuple(full.a[i] for i in want) and np.array_equal(got.gold, full.gold[want])
    assert got.gold.min() == full.gold.min() and got.gold.max() == full.gold.max()
    order = D.spread(full, k)  # the old mode, unchanged: evenly spaced in file order
    assert order.a == tuple(full.a[i] for i in sorted({int(round(j * (len(full) - 1) / (k - 1))) for j in range(k)}))
    with pytest.raises(D.DataError, match="choose from order, gold"):
        D.spread(full, k, by="random")


def test_a_code_change_or_no_resume_recomputes_kept_tasks(tiny, tmp_path, monkeypatch):
    """Issue 22.4 meets 25.6: a kept score must never hide a change to tpsurgery's code (the regress CI guard)."""
    import tpsurgery.resumable as R

    out = tmp_path / "r.json"
    evaluate_into(out, emb_for(tiny), ["sts13"], [SAMPLES], model_name="m", limit=8)
    assert evaluate_into(out, emb_for(tiny), ["sts13"], [SAMPLES], model_name="m", limit=8)[1] == ["sts13"]
    again = emb_for(tiny)
    assert evaluate_into(out, again, ["sts13"], [SAMPLES], model_name="m", limit=8, keep=False)[1] == []
    assert again.calls  # --no-resume: embedded afresh
    real = R.build_info()
    monkeypatch.setattr(R, "build_info", lambda: {**real, "code": "0" * 16})  # what another checkout would report
    assert evaluate_into(out, emb_for(tiny), ["sts13"], [SAMPLES], model_name="m", limit=8)[1] == []
