"""Evaluation harness: SentEval-format loaders on the real files, the STS and transfer evaluators, results records.

Expectations are computed independently of the harness (raw file reading, scipy/sklearn on separately encoded rows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

import tpsurgery
from tpsurgery import data as D
from tpsurgery.evaluation import (TASKS, classify, data_provenance, evaluate, evaluate_sts, evaluate_transfer,
                                  load_task, markdown_table, read_results, write_results)
from tpsurgery.testing import tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLES, SENTEVAL = SHARED / "format-samples", SHARED / "senteval"
DIRS = [SENTEVAL, SAMPLES]
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"shared data folder {SHARED} is not present")
RECIPE = "prompt: 'This sentence : <PST> \"{text}\" means in one word:\"'\ntp: {start: 1, stop: 2}\nexit_layer: 3"


class CountingEmbedder(tpsurgery.Embedder):
    """The real Embedder, recording every encode call (to prove 'one encode call over the union')."""

    def __init__(self, emb):
        super().__init__(emb.model, emb.tokenizer, emb.recipe, emb.backend, emb.spec)
        self.calls: list[list[str]] = []

    def encode(self, sentences, **kw):
        self.calls.append(list(sentences))
        return super().encode(sentences, **kw)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama", n_layers=4, seed=3)
    return model, tok, tpsurgery.apply(model, RECIPE, tokenizer=tok)


def raw_pairs(path: Path, gs: Path):
    """Independent reading of one STS sub-set: (s1, s2, score) for lines whose gold is not empty."""
    out = []
    for line, score in zip(path.read_text(encoding="utf-8").split("\n"), gs.read_text(encoding="utf-8").split("\n")):
        if score.strip():
            s1, s2 = line.split("\t")
            out.append((" ".join(s1.split()), " ".join(s2.split()), float(score)))
    return out


# -- loaders -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("year", sorted(D.STS_YEARS))
def test_sts_year_concatenates_subsets_and_skips_empty_gold(year):
    folder, subsets = D.STS_YEARS[year]
    want = [p for s in subsets for p in raw_pairs(SAMPLES / "STS" / folder / f"STS.input.{s}.txt",
                                                   SAMPLES / "STS" / folder / f"STS.gs.{s}.txt")]
    got = D.load_sts_year([SAMPLES], year)
    assert list(zip(got.a, got.b, got.gold.tolist())) == want
    assert len(got.files) == 2 * len(subsets)


def test_sts15_alignment_after_empty_gold_lines():
    # answers-forums: the gold file has 9 empty lines of 12; each kept pair keeps its own line's score
    folder = SAMPLES / "STS" / "STS15-en-test"
    gs = (folder / "STS.gs.answers-forums.txt").read_text().split("\n")
    kept = [i for i, g in enumerate(gs[:12]) if g.strip()]
    lines = (folder / "STS.input.answers-forums.txt").read_text().split("\n")
    got = D.load_sts_year([SAMPLES], "sts15")
    forum = [i for i, s in enumerate(got.subset) if s == "answers-forums"]
    assert len(forum) == len(kept) == 3
    for j, i in zip(forum, kept):
        assert got.a[j] == " ".join(lines[i].split("\t")[0].split()) and got.gold[j] == float(gs[i])


def test_sts12_ignores_the_ALL_gold_file():
    got = D.load_sts_year([SAMPLES], "sts12")
    assert set(got.subset) == set(D.STS_YEARS["sts12"][1]) and len(got) == 60


def test_stsb_and_sick_formats():
    test = D.load_stsb(DIRS, "test")
    assert len(test) == 12 and test.a[0] == "a girl is styling her hair ." and test.gold[0] == 2.5
    dev = D.load_stsb(DIRS, "dev")
    assert len(dev) == 1500 and D.load_stsb(DIRS, "dev", limit=200).a == dev.a[:200]
    sick = D.load_sick(DIRS, "test")  # CRLF file with a header
    assert len(sick) == 11 and sick.gold[0] == 3.3 and not any("\r" in s for s in sick.a + sick.b)
    assert sick.b[0] == "A group of kids is playing in a yard and an old man is standing in the background"
    assert len(D.load_sick(DIRS, "trial")) == 500


def test_spread_subsets_cover_every_source_and_class():
    dev = D.load_stsb(DIRS, "dev")
    assert len(set(dev.subset)) == 6 and dev.subset[0] == "main-captions/MSRvid"
    first, spread = load_task("stsb-dev", DIRS, 200), load_task("stsb-dev", DIRS, 200, spread=True)
    assert set(first.subset) == {"main-captions/MSRvid"} and len(set(spread.subset)) == 6 and len(spread) == 200
    i = dev.a.index(spread.a[1])
    assert (spread.b[1], spread.gold[1], spread.a[-1]) == (dev.b[i], dev.gold[i], dev.a[-1])
    cr = load_task("cr", DIRS, 50, spread=True).splits["all"]
    assert len(cr) == 50 and 0 < cr.y.sum() < 50  # both classes (the file lists positives first)
    assert len(load_task("stsb-dev", DIRS, 5000, spread=True)) == 1500
    with pytest.raises(tpsurgery.InputError, match="spread needs a limit"):
        load_task("stsb-dev", DIRS, spread=True)
    with pytest.raises(D.DataError, match="positive integer"):
        D.spread(dev, 0)


def test_binary_tasks_label_the_first_file_one():
    mr = D.load_binary(DIRS, "mr")
    split = mr.splits["all"]
    assert len(split) == 24 and split.y.tolist() == [1] * 12 + [0] * 12
    assert split.a[2] == "effective but too-tepid biopic"  # trailing space removed, tokens joined by one space
    subj = D.load_binary(DIRS, "subj").splits["all"]
    assert subj.a[0].startswith("the movie begins in the past") and subj.y[0] == 1  # objective = 1 as in SentEval
    cr = D.load_binary(DIRS, "cr").splits["all"]
    assert len(cr) == 2407 + sum(1 for _ in open(SENTEVAL / "CR" / "custrev.neg", encoding="latin-1"))
    mpqa = D.load_binary(DIRS, "mpqa", limit=5).splits["all"]  # limit: first lines of each class
    assert mpqa.a[5:9] == ("complaining", "failing to support", "desperately needs", "many years of decay")
    n_pos = len((SENTEVAL / "MPQA" / "mpqa.pos").read_text(encoding="latin-1").splitlines())
    assert D.load_binary(DIRS, "mpqa").splits["all"].y.sum() == n_pos


def test_trec_mrpc_and_sst2_formats(tmp_path):
    trec = D.load_trec(DIRS)
    assert trec.splits["test"].a[0] == "How far is it from Denver to Aspen ?"
    assert trec.splits["test"].y[0] == D.TREC_CLASSES.index("NUM") and len(trec.splits["train"]) == 12
    mrpc = D.load_mrpc(DIRS)  # header with a UTF-8 BOM
    tr = mrpc.splits["train"]
    assert len(tr) == 11 and tr.y[:2].tolist() == [1, 0] and tr.b[0].startswith("Referring to him as only")
    assert mrpc.paired and len(mrpc.splits["test"]) == 11
    for split in ("train", "dev", "test"):  # only the test file is sampled: reuse it for all three splits
        (tmp_path / "SST" / "binary").mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / "SST" / "binary" / "sentiment-test", tmp_path / "SST" / "binary" / f"sentiment-{split}")
    sst = D.load_sst2([tmp_path])
    assert sst.splits["test"].a[0] == "uneasy mishmash of styles and genres ." and sst.splits["test"].y[:4].tolist() == [0, 0, 1, 1]


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(D.DataError, match="STS/STSBenchmark/sts-test.csv not found"):
        D.load_stsb([tmp_path], "test")
    bad = tmp_path / "STS" / "STSBenchmark"
    bad.mkdir(parents=True)
    (bad / "sts-test.csv").write_text("genre\tfile\t2012\t0001\tfive\ta b\tc d\n")
    with pytest.raises(D.DataError, match=r"sts-test.csv:1: gold score 'five'"):
        D.load_stsb([tmp_path], "test")
    (bad / "sts-test.csv").write_text("only\tfour\tfields\there\n")
    with pytest.raises(D.DataError, match="sts-test.csv:1: expected at least 7"):
        D.load_stsb([tmp_path], "test")


def test_first_data_dir_wins(tmp_path):
    d = tmp_path / "STS" / "STSBenchmark"
    d.mkdir(parents=True)
    (d / "sts-test.csv").write_text("g\tf\ty\t1\t4.0\tmine one\tmine two\n")
    assert D.load_stsb([tmp_path, SAMPLES], "test").a == ("mine one",)
    assert len(D.load_stsb([SAMPLES, tmp_path], "test")) == 12


# -- STS evaluator -----------------------------------------------------------------------------------------------------
def test_sts_all_setting_one_encode_call_and_independent_spearman(tiny):
    model, tok, emb = tiny
    sets = [load_task(t, DIRS) for t in ("sts12", "sts16", "stsb", "sickr")]
    counting = CountingEmbedder(emb)
    got = evaluate_sts(counting, sets)
    union = {t for s in sets for t in (*s.a, *s.b)}
    assert len(counting.calls) == 1 and sorted(counting.calls[0]) == sorted(union)  # unique sentences, once
    for s in sets:  # independent: each pair side encoded separately, scipy Spearman over the concatenation
        ea, eb = emb.encode(list(s.a)), emb.encode(list(s.b))
        cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
        assert got[s.name] == pytest.approx(100 * spearmanr(cos, s.gold).statistic, abs=1e-6)
    sts12 = sets[0]  # 'all' is one correlation over the concatenation, not the mean over sub-sets
    per_subset = [evaluate_sts(emb, [subset(sts12, x)])[x] for x in D.STS_YEARS["sts12"][1]]
    assert abs(got["sts12"] - np.mean(per_subset)) > 1e-3


def subset(s: D.PairSet, name: str) -> D.PairSet:
    keep = [i for i, k in enumerate(s.subset) if k == name]
    return D.PairSet(name, tuple(s.a[i] for i in keep), tuple(s.b[i] for i in keep), s.gold[keep],
                     (name,) * len(keep), ())


def test_sts_all_layers_match_separate_exit_layers(tiny):
    model, tok, emb = tiny
    stsb = load_task("stsb", DIRS)
    per_layer = evaluate_sts(emb, [stsb], all_layers=True)["stsb-test"]
    assert per_layer.shape == (emb.plan.exit_layer + 1,)
    for m in (1, 2, 3):
        single = tpsurgery.apply(model, emb.recipe.replace(exit_layer=m), tokenizer=tok)
        assert per_layer[m] == pytest.approx(evaluate_sts(single, [stsb])["stsb-test"], abs=1e-4)


# -- transfer evaluator ------------------------------------------------------------------------------------------------
def test_classify_protocols_on_separable_and_random_features():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    sep = np.c_[y + 0.05 * rng.standard_normal(60), rng.standard_normal((60, 3))]
    task = D.ClassificationSet("t", {"all": D.Split(("x",) * 60, y)}, 2)
    assert classify(task, {"all": sep}, kfold=3)["acc"] == 100.0
    noise = rng.standard_normal((60, 40))
    assert classify(task, {"all": noise}, kfold=3)["acc"] < 80.0
    split = D.ClassificationSet("s", {k: D.Split(("x",) * 60, y) for k in ("train", "dev", "test")}, 2)
    assert classify(split, {"train": sep, "dev": sep, "test": sep})["acc"] == 100.0
    inv = D.ClassificationSet("i", {k: D.Split(("x",) * 60, y if k == "train" else 1 - y) for k in ("train", "test")}, 2)
    assert classify(inv, {"train": sep, "test": sep}, kfold=3)["acc"] == 0.0  # trained on train, scored on test
    # the signal at a scale of 1e-4 (hidden states differ that much across layers/models): C in 2^-2..2^3 cannot use
    # it on raw features (SentEval's classifier, standardize=False); after standardization it separates perfectly
    tiny_scale = np.c_[1e-4 * (y + 0.05 * rng.standard_normal(60)), rng.standard_normal((60, 3))]
    assert classify(task, {"all": tiny_scale}, kfold=3)["acc"] == 100.0
    assert classify(task, {"all": tiny_scale}, kfold=3, standardize=False)["acc"] < 80.0


def test_transfer_tasks_end_to_end(tiny, tmp_path):
    model, tok, emb = tiny
    counting = CountingEmbedder(emb)
    sets = [load_task(t, DIRS, limit=12) for t in ("mr", "trec", "mrpc")]
    got = evaluate_transfer(counting, sets, kfold=3)
    assert len(counting.calls) == 3  # one encode call per task (train + test together)
    assert sorted(counting.calls[2]) == sorted(set(t for s in sets[2].splits.values() for t in s.texts()))
    for name in ("mr", "trec", "mrpc"):
        assert 0.0 <= got[name]["acc"] <= 100.0 and 0.0 <= got[name]["dev"] <= 100.0


# -- results -----------------------------------------------------------------------------------------------------------
def test_results_record_json_and_table(tiny, tmp_path):
    model, tok, emb = tiny
    run = evaluate(emb, ["sts13", "stsb", "mr"], DIRS, model_name="tiny-llama", kfold=3)
    assert run["model"] == "tiny-llama" and run["recipe"]["hash"] == emb.recipe.hash() and run["kind"] == "mixed"
    assert set(run["scores"]) == {"sts13", "stsb", "mr"} and run["seconds"] > 0
    files = run["data"]["stsb"]["files"]
    assert files == {str(SAMPLES / "STS/STSBenchmark/sts-test.csv"): D.file_hash(SAMPLES / "STS/STSBenchmark/sts-test.csv")}
    assert set(run["versions"]) >= {"torch", "transformers", "nnsight", "tpsurgery"}
    path = write_results(tmp_path / "out" / "r.json", [run])
    assert read_results(path) == json.loads(json.dumps([run]))
    other = {k: v for k, v in run.items() if k not in ("uncertainty", "pairs")}
    table = markdown_table([run, {**other, "recipe": {"name": "other"}, "scores": {"sts13": 1.0}}])
    rows = table.splitlines()
    assert rows[0] == "| Method | STS13 | STS-B | MR | Avg. |" and rows[3].endswith("| 1.00 | - | - | - |")
    assert rows[2].split(" | ")[-1] == f"{np.mean(list(run['scores'].values())):.2f} |"  # MR: no average interval
    lo, hi = run["uncertainty"]["tasks"]["stsb"]["interval"]
    assert f"{run['scores']['stsb']:.2f} [{lo:.1f}, {hi:.1f}]" in rows[2] and "MR" not in run["pairs"]


def test_every_task_has_metadata_and_loads():
    for name, task in TASKS.items():
        if name == "sst2":  # only the test file is sampled (covered above)
            continue
        data = task.load(DIRS, limit=3)
        sizes = [len(data)] if task.kind == "sts" else [len(s) for s in data.splits.values()]
        assert sizes and min(sizes) > 0, name


def test_mteb_adapter_matches_the_sts_evaluator(tiny, monkeypatch):
    pytest.importorskip("mteb")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import mteb

    from tpsurgery.mteb_adapter import local_sts_task, mteb_encoder

    model, tok, emb = tiny
    result = mteb.evaluate(mteb_encoder(emb, name="test/tiny"), [local_sts_task("stsb", DIRS)], cache=None,
                           show_progress_bar=False)
    got = result.task_results[0].scores["test"][0]["cosine_spearman"]
    assert 100 * got == pytest.approx(evaluate_sts(emb, [load_task("stsb", DIRS)])["stsb-test"], abs=1e-6)


def test_cli_eval_sts_and_transfer(tmp_path):
    from typer.testing import CliRunner

    from tpsurgery.cli import app

    model, tok = tiny_model("gpt2", n_layers=2, seed=4)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text("name: tiny-eol\nprompt: 'This : \"{text}\" means'\nexit_layer: 2\n")
    common = ["-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "m"), "-d", str(SENTEVAL), "-d", str(SAMPLES),
              "--no-progress"]
    cli = CliRunner()
    res = cli.invoke(app, ["eval", "sts", *common, "--tasks", "sts13,sickr", "-o", str(tmp_path / "s.json"),
                           "--markdown", str(tmp_path / "s.md")])
    assert res.exit_code == 0, res.output
    run = read_results(tmp_path / "s.json")[0]
    assert run["recipe"]["name"] == "tiny-eol" and set(run["scores"]) == {"sts13", "sickr"}
    assert (tmp_path / "s.md").read_text().startswith("| Method | STS13 | SICK-R | Avg. |\n|---|---|---|---|\n| tiny-eol |")
    res = cli.invoke(app, ["eval", "transfer", *common, "--tasks", "trec", "--kfold", "2", "-o", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    assert read_results(tmp_path / "t.json")[0]["details"]["trec"] | {"dev_acc": 0} == \
        {"kfold": 2, "standardize": True, "dev_acc": 0}
    res = cli.invoke(app, ["eval", "transfer", *common, "--tasks", "trec", "--kfold", "2", "--no-standardize",
                           "-o", str(tmp_path / "t2.json")])
    assert res.exit_code == 0 and read_results(tmp_path / "t2.json")[0]["details"]["trec"]["standardize"] is False
    res = cli.invoke(app, ["eval", "sts", *common, "--tasks", "sickr-trial", "--limit", "20", "--spread",
                           "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert read_results(tmp_path / "p.json")[0]["data"]["sickr-trial"] | {"files": 0} == \
        {"files": 0, "n": 20, "limit": 20, "spread": True}
    bad = cli.invoke(app, ["eval", "sts", *common, "--tasks", "mr"])
    assert bad.exit_code != 0 and "unknown sts task 'mr'" in str(bad.exception)


def test_hub_route_offline(tmp_path, monkeypatch):
    """The hub route never runs in tests: its pieces do (mteb's pinned names, a real datasets.Dataset, offline errors)."""
    pytest.importorskip("datasets")
    pytest.importorskip("mteb")  # the route reads pinned names from mteb (the lowest-versions CI venv has no mteb)
    from datasets import Dataset

    from tpsurgery.hub import HUB_TASKS, hub_dataset, load_hub

    assert all(hub_dataset(t)[0].startswith("mteb/") and len(hub_dataset(t)[1]) == 40 for t in HUB_TASKS)
    rows = Dataset.from_dict({"sentence1": ["A  man .", "b"], "sentence2": ["c", "d"], "score": [5.0, 0.0]})
    seen = {}

    def fake_load(path, revision, split):
        seen.update(path=path, revision=revision, split=split)
        return rows

    got = load_hub("stsb-dev", load=fake_load)
    assert (seen["path"], seen["split"]) == ("mteb/stsbenchmark-sts", "validation") and got.a == ("A man .", "b")
    assert data_provenance([got], None, ["stsb-dev"])["stsb-dev"]["hub"].startswith("mteb/stsbenchmark-sts@")
    with pytest.raises(D.DataError, match="missing column"):
        load_hub("sts12", load=lambda *a, **k: Dataset.from_dict({"text": ["x"]}))

    def offline(*a, **k):
        raise ConnectionError("no network")

    with pytest.raises(D.DataError, match="could not load mteb/sts13-sts@.*offline, pass --data-dir") as err:
        load_hub("sts13", load=offline)
    assert isinstance(err.value.__cause__, ConnectionError)
    # load_task: local files win; a missing STS file falls back to the hub (offline here: a clean DataError)
    assert load_task("stsb-dev", DIRS, 3, hub=True).a == D.load_stsb(DIRS, "dev", 3).a
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(D.DataError, match="from the Hugging Face hub"):
        load_task("sickr", [tmp_path], hub=True)
    with pytest.raises(D.DataNotFound, match="mr has no hub copy"):
        load_task("mr", [tmp_path], hub=True)
    with pytest.raises(D.DataNotFound, match="not found"):
        load_task("sickr", [tmp_path])
