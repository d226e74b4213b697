"""``tpsurgery tune``: the split is disjoint and seeded, selection never reads held-out pairs, the written recipe
recreates the chosen cell's scores, noise is called noise, and CLI errors are one line."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsurgery
from tpsurgery.cli import main
from tpsurgery.data import file_hash, load_stsb
from tpsurgery.errors import InputError, RecipeError
from tpsurgery.evaluation import evaluate_sts, sts_cosines
from tpsurgery.library import load_recipe
from tpsurgery.stats import spearman
from tpsurgery.sweep import run_sweep
from tpsurgery.sweep_store import pairs_digest
from tpsurgery.testing import tiny_model
from tpsurgery.tune import (Grid, SelectionNoiseWarning, grid_cosines, noise_warning, score_split, split_folds,
                            tune)
from tpsurgery.variants import variants

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
PROMPT = "prompt: 'This sentence : <PST> \"{text}\" means in one word:\"'\nexit_layer: -1\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))


def fake_grid(cos: np.ndarray, base: np.ndarray) -> Grid:
    cells = tuple({"variant": "", "row": f"row {c}", "exit_layer": 1, "recipe": None} for c in range(cos.shape[1]))
    return Grid(cells, cos, base, tpsurgery.parse_recipe("prompt: '{text}'"), 1)


# -- the split ---------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 300), folds=st.integers(2, 6), seed=st.integers(0, 2**31))
def test_split_is_a_seeded_partition_into_near_equal_folds(n, folds, seed):
    if n < 2 * folds:
        with pytest.raises(InputError, match="folds of at least 2 pairs"):
            split_folds(n, folds, seed)
        return
    fold = split_folds(n, folds, seed)
    assert fold.shape == (n,) and set(fold.tolist()) == set(range(folds))  # every pair in exactly one fold
    sizes = np.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1 and sizes.min() >= 2
    assert split_folds(n, folds, seed).tolist() == fold.tolist()  # deterministic
    held, sel = np.flatnonzero(fold == 0), np.flatnonzero(fold != 0)
    assert not set(held) & set(sel) and len(held) + len(sel) == n


def test_the_seed_changes_the_split_and_bad_fold_counts_are_refused():
    assert split_folds(100, 2, 0).tolist() != split_folds(100, 2, 1).tolist()
    for bad in (1, 0, 2.5):
        with pytest.raises(InputError, match="folds must be an integer >= 2"):
            split_folds(10, bad, 0)


# -- selection reads the selection pairs only ----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), cells=st.integers(1, 6), n=st.integers(8, 60), folds=st.integers(2, 4),
       data=st.data())
def test_changing_held_out_pairs_never_changes_the_choice(seed, cells, n, folds, data):
    rng = np.random.default_rng(seed)
    gold, cos, base = rng.uniform(0, 5, n), rng.normal(size=(n, cells)), rng.normal(size=n)
    if n < 2 * folds:
        return
    split_seed = data.draw(st.integers(0, 99))
    held = split_folds(n, folds, split_seed) == 0
    gold2, cos2 = gold.copy(), cos.copy()
    gold2[held] = rng.uniform(0, 5, held.sum())  # anything at all on the held-out pairs
    cos2[held] = rng.normal(size=(held.sum(), cells))
    a = score_split(fake_grid(cos, base), gold, "t", folds, seed=split_seed, resamples=100)
    b = score_split(fake_grid(cos2, base), gold2, "t", folds, seed=split_seed, resamples=100)
    assert a[0] == b[0] and a[1]["chosen"] == b[1]["chosen"]
    np.testing.assert_array_equal(a[1]["scores"], b[1]["scores"])
    assert a[3:] == b[3:] == (n - held.sum(), held.sum())


def test_selection_and_held_out_scores_are_those_of_their_pairs():
    rng = np.random.default_rng(3)
    gold = rng.uniform(0, 5, 80)
    cos = np.stack([gold + rng.normal(0, s, 80) for s in (3.0, 1.0, 5.0)], axis=1)
    base = gold + rng.normal(0, 4.0, 80)
    chosen, sel, held, n_sel, n_ho = score_split(fake_grid(cos, base), gold, "t", 4, seed=7, resamples=200)
    fold = split_folds(80, 4, 7)
    s, h = fold != 0, fold == 0
    assert chosen == int(np.argmax([spearman(cos[s, c], gold[s]) for c in range(3)]))
    assert held["chosen"] == round(spearman(cos[h, chosen], gold[h]), 4)
    assert held["baseline"] == round(spearman(base[h], gold[h]), 4)
    assert (n_sel, n_ho) == (60, 20) and held["chosen_interval"][0] < held["chosen"] < held["chosen_interval"][1]


def test_cross_validation_scores_each_fold_with_the_cell_chosen_without_it():
    rng = np.random.default_rng(5)
    gold = rng.uniform(0, 5, 60)
    cos = np.stack([gold + rng.normal(0, s, 60) for s in (2.0, 2.1, 6.0)], axis=1)
    base = rng.normal(size=60)
    chosen, sel, held, _, _ = score_split(fake_grid(cos, base), gold, "t", 3, cv=True, seed=1, resamples=200)
    fold = split_folds(60, 3, 1)
    want = []
    for f in range(3):
        c = int(np.argmax([spearman(cos[fold != f, k], gold[fold != f]) for k in range(3)]))
        want.append(spearman(cos[fold == f, c], gold[fold == f]))
        assert held["folds"][f]["chosen"] == f"row {c}, exit hidden_states[1]"
    assert held["chosen"] == round(float(np.mean(want)), 4)
    assert chosen == int(np.argmax([spearman(cos[:, k], gold) for k in range(3)]))  # the written cell: all pairs
    assert held["agree"] == sum(f["chosen"] == f"row {chosen}, exit hidden_states[1]" for f in held["folds"])


def test_cells_the_selection_pairs_cannot_tell_from_the_chosen_one_are_counted():
    rng = np.random.default_rng(2)
    gold = rng.uniform(0, 5, 300)
    good = gold + rng.normal(0, 1.0, 300)
    cos = np.stack([rng.normal(size=300), good, good + rng.normal(0, 1e-3, 300), -gold], axis=1)
    chosen, sel, _, _, _ = score_split(fake_grid(cos, gold), gold, "t", 2, resamples=200)
    twin = {1: 2, 2: 1}[chosen]
    assert sel["tied_cells"] == [f"row {twin}, exit hidden_states[1]"] and sel["tied_checked"] == 3


# -- noise ---------------------------------------------------------------------------------------------------------
def test_a_real_gain_is_not_called_noise_and_a_noise_gain_is():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 400)
    good = gold + rng.normal(0, 1.0, 400)
    _, _, held, _, _ = score_split(fake_grid(good[:, None], rng.normal(size=400)), gold, "t", 2, resamples=300)
    assert held["diff_interval"][0] > 0 and noise_warning(held, same=False) is None
    twin = good + rng.normal(0, 1e-3, 400)  # the same quality as the baseline
    _, _, held, _, _ = score_split(fake_grid(twin[:, None], good), gold, "t", 2, resamples=300)
    assert "inside the noise" in noise_warning(held, same=False)
    assert "worse than the baseline" in noise_warning({"diff": -2.0, "diff_interval": [-3.0, -1.0]}, False)
    assert "baseline's embeddings" in noise_warning({"diff": 0.0, "diff_interval": [0.0, 0.0]}, True)


# -- on a model ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=4, seed=3)


@needs_samples
def test_written_recipe_recreates_the_chosen_cells_scores(tiny, tmp_path):
    model, tok = tiny
    pairs = load_stsb([SAMPLES], "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionNoiseWarning)
        res = tune(model, PROMPT, pairs, stops=[2, 3], starts=[0, 1], exits=[2, 3, 4], tokenizer=tok, resamples=100)
    assert len(res.grid.cells) == 5 * 3  # no TP + 4 TP rows, x 3 exits
    paths = res.write(tmp_path)
    written = load_recipe(str(paths["recipe"]))
    assert written.hash() == res.grid.cells[res.chosen]["recipe"].hash()
    text = paths["recipe"].read_text()
    assert text.startswith("# grid: ") and f"data {res.meta['data']}" in text and "held-out" in written.description
    emb = tpsurgery.apply(model, written, tokenizer=tok)
    np.testing.assert_allclose(sts_cosines(emb, [pairs])[pairs.name], res.grid.cos[:, res.chosen], atol=1e-5)
    fold = split_folds(len(pairs), 2, 0)
    for part, want in ((fold == 0, res.held_out["chosen"]), (fold != 0, res.selection["chosen"])):
        sub = _subset(pairs, part)
        got = evaluate_sts(tpsurgery.apply(model, written, tokenizer=tok), [sub])[sub.name]
        assert got == pytest.approx(want, abs=1e-3)
    sub = _subset(pairs, fold == 0)  # the baseline is the given recipe, on the same held-out pairs
    base = evaluate_sts(tpsurgery.apply(model, PROMPT, tokenizer=tok), [sub])[sub.name]
    assert base == pytest.approx(res.held_out["baseline"], abs=1e-3)
    stored = json.loads(paths["json"].read_text())
    assert stored["chosen"]["label"] == res.grid.label(res.chosen) and len(stored["cells"]) == 15
    assert stored["data"] == pairs_digest(pairs) and stored["seed"] == 0 and stored["folds"] == 2
    assert list(stored["files"].values()) == [file_hash(f) for f in pairs.files]
    assert stored["held_out"] == res.held_out and stored["grid"]["exits"] == [2, 3, 4]


@needs_samples
def test_held_out_gold_never_changes_what_a_model_grid_chooses(tiny):
    model, tok = tiny
    pairs = load_stsb([SAMPLES], "test")
    g = grid_cosines(model, PROMPT, pairs, stops=[2, 3], tokenizer=tok)
    held = split_folds(len(pairs), 2, 4) == 0
    rng = np.random.default_rng(0)
    for _ in range(5):
        gold = pairs.gold.copy()
        gold[held] = rng.uniform(0, 5, held.sum())
        assert score_split(g, gold, "t", seed=4, resamples=100)[0] == score_split(g, pairs.gold, "t", seed=4,
                                                                                  resamples=100)[0]


@needs_samples
def test_a_tiny_random_model_gets_the_noise_warning(tiny):
    model, tok = tiny
    pairs = load_stsb([SAMPLES], "test")
    with pytest.warns(SelectionNoiseWarning, match="inside the noise|worse than|baseline's embeddings"):
        res = tune(model, PROMPT, pairs, stops=[2, 3], tokenizer=tok, resamples=100, cv=True, folds=3)
    assert res.warning and res.meta["cv"] and len(res.held_out["folds"]) == 3
    assert "mean of 3 held-out folds" in res.report() and "folds chose: " in res.report()
    assert "mean held-out score of 3-fold selection" in res.recipe().description
    assert res.report().splitlines()[-1] == f"warning: {res.warning}"


@needs_samples
def test_variants_share_one_pass_and_the_baseline_can_be_no_tp(tiny):
    model, tok = tiny
    pairs = load_stsb([SAMPLES], "test")
    cp = PROMPT + ("runs: {irrelevant: 'The irrelevant information : \"{text}\" means'}\nedits:\n"
                   "  - {site: attn_out_in, layers: 1, rows: last, op: scale, factor: 2.0}\n")
    g = grid_cosines(model, cp + "tp: {start: 1, stop: 3}\n", pairs, stops=[3], exits=[4],
                     vary={"edits.layers": [1, 2], "edits.factor": [0.5, 2.0]}, against="no-tp", tokenizer=tok)
    assert g.work["passes"] == 1 and len(g.cells) == 4 * 2
    apart = sum(run_sweep(model, v, pairs, stops=[3], tokenizer=tok).extra["layer_forwards_per_batch"]
                for _, v in variants(tpsurgery.parse_recipe(cp + "tp: {start: 1, stop: 3}\n"),
                                     {"edits.layers": [1, 2], "edits.factor": [0.5, 2.0]}))
    assert g.work["layer_forwards_per_batch"] - 4 < apart  # variants share layers too (4: the baseline's own pass)
    assert g.against.tp.empty and g.against.placeholder.mask == "all"
    for c in (0, 7):  # a cell's cosines are those of its recipe run alone
        emb = tpsurgery.apply(model, g.cells[c]["recipe"], tokenizer=tok)
        alone = evaluate_sts(emb, [pairs])[pairs.name]
        assert spearman(g.cos[:, c], pairs.gold) == pytest.approx(alone, abs=1e-3)
    base = evaluate_sts(tpsurgery.apply(model, g.against, tokenizer=tok), [pairs])[pairs.name]
    assert spearman(g.base, pairs.gold) == pytest.approx(base, abs=1e-3)


@needs_samples
def test_a_baseline_with_other_templates_runs_in_a_pass_of_its_own(tiny):
    model, tok = tiny
    pairs = load_stsb([SAMPLES], "test")
    other = "prompt: 'In one word: \"{text}\"'\nexit_layer: 3\n"
    g = grid_cosines(model, PROMPT, pairs, stops=[2], exits=[4], against=other, tokenizer=tok)
    assert g.work["passes"] == 2 and len(g.cells) == 2
    want = sts_cosines(tpsurgery.apply(model, other, tokenizer=tok), [pairs])[pairs.name]
    np.testing.assert_allclose(g.base, want, atol=1e-5)


def _subset(pairs, mask):
    i = np.flatnonzero(mask)
    return dataclasses.replace(pairs, a=tuple(pairs.a[j] for j in i), b=tuple(pairs.b[j] for j in i),
                               gold=pairs.gold[i], subset=tuple(pairs.subset[j] for j in i))


# -- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, tok = tiny
    folder = tmp_path_factory.mktemp("tune") / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["tpsurgery", "tune", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@needs_samples
def test_cli_tune_reports_and_writes(saved, tmp_path, monkeypatch, capsys):
    (tmp_path / "r.yaml").write_text(PROMPT + "name: mine\n")
    code, out, err = _run(monkeypatch, capsys, "-r", str(tmp_path / "r.yaml"), "-m", str(saved), "-d", str(SAMPLES),
                          "--task", "stsb", "--stops", "2-3", "--exits", "3-4", "-o", str(tmp_path / "o"),
                          "--no-progress", "--resamples", "100")
    assert code == 0, err
    assert "grid: 6 cells on stsb-test (12 pairs" in out and "6 selection / 6 held-out pairs" in out
    assert "held-out gain over the baseline: " in out and "optimism: " in out
    assert sum(line.startswith("warning: ") for line in out.splitlines()) == 1  # 6 held-out pairs: noise
    tuned = yaml.safe_load((tmp_path / "o" / "tuned.yaml").read_text())
    assert tuned["name"] == "mine-tuned" and tuned["exit_layer"] in (3, 4)


@needs_samples
@pytest.mark.parametrize("args, message", [
    (["--folds", "1"], "folds must be an integer >= 2"),
    (["--folds", "7"], "12 pairs cannot be split into 7 folds"),
    (["--exits", "9"], "exit layers [9] are outside hidden_states[0..4]"),
    (["--against", "prompt: '{text}'\nexit_layer: auto"], "exit_layer"),
    (["--task", "mr"], "unknown sts task 'mr'"),
    (["--vary", "edits.factor=2"], "no section `edits`"),
    (["--stops", ","], "--stops names no value"),
])
def test_cli_errors_are_one_line(saved, monkeypatch, capsys, args, message):
    code, out, err = _run(monkeypatch, capsys, "-r", PROMPT, "-m", str(saved), "-d", str(SAMPLES), "--task", "stsb",
                          "--no-progress", *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@needs_samples
def test_an_empty_exit_list_is_refused(tiny):
    with pytest.raises(InputError, match="no exit layer to choose from"):
        grid_cosines(tiny[0], PROMPT, load_stsb([SAMPLES], "test"), exits=[], tokenizer=tiny[1])


def test_a_baseline_with_exit_auto_is_refused():
    with pytest.raises(RecipeError, match="numbered exit layer"):
        from tpsurgery.tune import against_recipe

        against_recipe(tpsurgery.parse_recipe("prompt: '{text}'\nexit_layer: auto"), "recipe")


@needs_samples
@pytest.mark.parametrize("vary, pooling, field", [
    ({"tp.alpha": [0.3, 1.0]}, None, "tp.alpha"),  # silently replaced by the grid's TP rows before
    ({"exit_layer": [2, 3]}, None, "exit_layer"),  # every exit is read anyway
    (None, {"tokens": "last", "layers": [2, 4]}, "pooling.layers"),  # scored one layer, wrote an unloadable recipe
])
def test_fields_the_grid_sets_itself_are_refused_not_overridden(tiny, vary, pooling, field):
    """Found by review: ``--vary tp.alpha`` cells were labelled alpha=0.3 and ran alpha 1; a recipe with
    ``pooling.layers`` was scored on its deepest layer alone (or crashed on the shipped smollm2-layer-average)."""
    model, tok = tiny
    pairs = load_stsb([SAMPLES], "test")
    data = tpsurgery.parse_recipe(PROMPT).to_dict()
    if pooling is not None:
        data = {**{k: v for k, v in data.items() if k != "exit_layer"}, "pooling": pooling}
    recipe = tpsurgery.parse_recipe(data)
    with pytest.raises(RecipeError, match=f"`{field}`"):
        grid_cosines(model, recipe, pairs, stops=[3], exits=[4], vary=vary, tokenizer=tok)


def test_sweep_refuses_a_varied_tp_field_unless_it_runs_the_recipes_own_schedule():
    from tpsurgery.variants import check_swept

    with pytest.raises(RecipeError, match="`tp.alpha`.*--alphas"):
        check_swept({"tp.alpha": [0.5]})
    check_swept({"tp.alpha": [0.5], "edits.factor": [1.0]}, own_schedule=True)
    with pytest.raises(RecipeError, match="`exit_layer`"):
        check_swept({"exit_layer": [3]}, own_schedule=True)


def test_stops_that_leave_no_tp_row_are_an_error_not_a_grid_of_exits_only():
    from tpsurgery.sweep import grid

    recipe = tpsurgery.parse_recipe(PROMPT)
    assert [label for label, _ in grid(recipe, 4, stops=[3, 9])] == ["no TP", "TP [1,3)"]  # 9: another model's
    with pytest.raises(InputError, match=r"no TP row: stops \[9, 12\]"):
        grid(recipe, 4, stops=[9, 12])
