"""Shared sweeps (issue 6/7): plans that agree on their first layers run them once, and nothing changes.

``tpsurgery.sharing.encode_schedules`` must equal one ``encode(all_layers=True)`` per plan, for random decoder families,
recipes (masks, bidirectional layers, alpha, resume, inits), schedules, texts and batch sizes, with and without
prompt-prefix reuse; it must also really skip the shared layers (counted), and sweeps must not depend on chunking.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tpsurgery
from prop_support import model_for
from strategies import archs, batch_sizes, engine_recipes, scaled, sentence_lists
from tpsurgery.data import load_stsb
from tpsurgery.plan import compile_plan
from tpsurgery.sharing import encode_schedules, layer_runs, share
from tpsurgery.sweep import run_sweep
from tpsurgery.testing import tiny_model

from test_prop_engine import rel_err
from tpsurgery.foreign import observer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # truncation, dropped TP spans: expected here
N = 4  # decoder layers of the property models
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"


@st.composite
def schedules(draw, n_layers: int = N):
    """A TP schedule change for a base recipe: spans / resume / exit layer (what sweeps vary), sometimes masks."""
    cuts = sorted(draw(st.lists(st.integers(0, n_layers), max_size=4, unique=True)))
    change: dict = {"tp": {"spans": [{"start": a, "stop": b} for a, b in zip(cuts[::2], cuts[1::2])]},
                    "exit_layer": draw(st.integers(0, n_layers))}
    if draw(st.integers(0, 3)) == 0:
        change["attention"] = {"bidirectional": draw(st.sampled_from(["none", "sentence", "last_token"]))}
    if draw(st.integers(0, 3)) == 0:  # plans of one call that differ in more than the schedule must not share
        change["tp"]["alpha"] = draw(st.sampled_from([1.0, 0.5]))
    if draw(st.integers(0, 3)) == 0:
        change["pooling"] = draw(st.sampled_from(["last", "mean"]))
    if draw(st.integers(0, 3)) == 0:
        change["placeholder"] = {"init": draw(st.sampled_from(["token", "zeros", "ones"])),
                                 "mask": draw(st.sampled_from(["none", "first_layer"]))}
    if draw(st.integers(0, 2)) == 0:  # plans that differ in their edit lists (the base recipe's `edits` section)
        change["edits_from"] = draw(st.integers(0, 3))
    return change


@scaled(0.5)
@given(data=st.data())
def test_shared_runs_equal_one_run_per_plan(data):
    arch = data.draw(archs(), label="arch")
    model, tok = model_for(arch)
    base = tpsurgery.parse_recipe(data.draw(engine_recipes(n_layers=N, surgery=True), label="recipe"))
    changes = data.draw(st.lists(schedules(), min_size=1, max_size=5), label="schedules")
    texts = data.draw(sentence_lists(max_size=4, long=False), label="texts")
    bs = data.draw(batch_sizes(), label="batch size")
    emb = tpsurgery.apply(model, base, tokenizer=tok, prefix_cache=data.draw(st.booleans(), label="prefix"))
    d = model.get_input_embeddings().weight.shape[1]
    recipes = []
    for c in changes:
        r = base.model_copy(deep=True)
        tp = {**r.tp.model_dump(), **c["tp"]}
        try:
            extra = {k: c[k] for k in ("attention", "pooling") if k in c}
            if "edits_from" in c:  # keep only the edits of layers >= edits_from
                extra["edits"] = [d for d, e in zip(r.to_dict().get("edits", []), r.edits)
                                  if e.site == "embed" or e.layer_list()[0] >= c["edits_from"]]
            if "placeholder" in c:
                extra["placeholder"] = {**r.placeholder.model_dump(), **c["placeholder"]}
            recipes.append(r.replace(tp={k: v for k, v in tp.items() if k not in ("start", "stop")},
                                     exit_layer=c["exit_layer"], **extra))
        except tpsurgery.RecipeError:  # e.g. a bidirectional span that starts at a placeholder the prompt lacks
            pass
    assume(recipes)
    plans = [emb.plan_for(r) for r in recipes]
    try:
        want = [emb.encode(texts, batch_size=bs, all_layers=True, plan=p, convert_to_tensor=True) for p in plans]
    except tpsurgery.TpsurgeryError:
        with pytest.raises(tpsurgery.TpsurgeryError):  # an input the plans reject is rejected here too
            encode_schedules(emb, texts, plans, batch_size=bs)
        return
    got = encode_schedules(emb, texts, plans, batch_size=bs)
    for r, p in enumerate(plans):
        for m in range(p.exit_layer + 1):
            assert rel_err(got[r, m], want[r][:, m]) <= 1e-6, (r, m, share(plans).start)


def test_shared_layers_are_not_run_again():
    """Decoder-layer forwards counted by hooks == ``layer_runs`` (436 of 870 for the 29-row sweep of 30 layers)."""
    model, tok = tiny_model("llama", n_layers=6)
    emb = tpsurgery.apply(model, "prompt: 'x : <PST> \"{text}\" means'", tokenizer=tok, prefix_cache=False)
    plans = [compile_plan(emb.recipe.replace(tp={"start": 1, "stop": k}), 6, 32, emb.placeholder_id)
             for k in range(2, 7)]
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(observer(lambda *a, i=i: calls.append(i)))
             for i, layer in enumerate(model.model.layers)]
    try:
        encode_schedules(emb, ["a b", "c d e", "f"], plans, batch_size=2)  # two batches
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2 * layer_runs(plans) == 2 * (6 + 4 + 3 + 2 + 1)
    assert layer_runs(plans, resume=False) == 5 * 6


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
def test_sweep_scores_do_not_depend_on_sharing_or_chunking():
    model, tok = tiny_model("qwen2", n_layers=4, seed=3)
    pairs = load_stsb([SAMPLES], "test")
    prompt = "prompt: 'This sentence : <PST> \"{text}\" means in one word:\"'"
    kw = dict(starts=[0, 1], tokenizer=tok, batch_size=3)
    shared = run_sweep(model, prompt, pairs, **kw)
    alone = run_sweep(model, prompt, pairs, share_layers=False, **kw)
    chunked = run_sweep(model, prompt, pairs, memory_gb=1e-6, **kw)  # a few pairs per chunk
    assert [r["scores"] for r in shared.rows] == [r["scores"] for r in chunked.rows]
    for a, b in zip(shared.rows, alone.rows):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3, nan_ok=True)
    assert shared.extra["layer_forwards_per_batch"] < alone.extra["layer_forwards_per_batch"]
    with pytest.raises(tpsurgery.InputError, match="memory_gb must be a positive"):
        run_sweep(model, prompt, pairs, memory_gb=0, **kw)


def test_encode_schedules_names_the_callers_input_and_warns_once():
    model, tok = tiny_model("llama", n_layers=3)
    emb = tpsurgery.apply(model, "prompt: 'x <PST> {text} y'\npooling: mean", tokenizer=tok)
    plans = [compile_plan(emb.recipe.replace(tp={"start": 1, "stop": k}), 3, 32, emb.placeholder_id) for k in (2, 3)]
    with pytest.raises(tpsurgery.InputError, match="mean pooling") as err:
        encode_schedules(emb, ["a", "a", ""], plans)
    assert err.value.index == 2
    with pytest.warns(UserWarning, match="truncated") as rec:
        encode_schedules(emb, ["b", "c " * 600, "c " * 600], plans)
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1


def test_a_row_resumes_from_the_origin_of_a_row_that_starts_too_late():
    """[1,2), [1,2)+[3,4), [1,3): the third agrees with the second up to layer 2, but the second starts at layer 3, so
    the third must resume from the first (``share`` walks up the origins)."""
    model, tok = tiny_model("llama", n_layers=5)
    emb = tpsurgery.apply(model, "prompt: 'x <PST> {text} y'", tokenizer=tok)
    spans = [[(1, 2)], [(1, 2), (3, 4)], [(1, 3)]]
    plans = [compile_plan(emb.recipe.replace(tp={"spans": [{"start": a, "stop": b} for a, b in sp]}), 5, 32,
                          emb.placeholder_id) for sp in spans]
    sharing = share(plans)
    assert (sharing.origin, sharing.start) == ((None, 0, 0), (0, 3, 2))
    got = encode_schedules(emb, ["a b", "c d e"], plans)
    for r, p in enumerate(plans):
        want = emb.encode(["a b", "c d e"], all_layers=True, plan=p, convert_to_tensor=True)
        assert all(torch.equal(got[r, m], want[:, m]) for m in range(6))


def test_mixed_pooling_and_non_finite_rows_are_handled_like_encode():
    model, tok = tiny_model("llama", n_layers=3)
    emb = tpsurgery.apply(model, "prompt: 'x <PST> {text} y'", tokenizer=tok)
    last, mean = (compile_plan(emb.recipe.replace(tp={"start": 1, "stop": 3}, pooling=p), 3, 32, emb.placeholder_id)
                  for p in ("last", "mean"))
    for plans in ([last, mean], [mean, last]):  # the mean-pooling plan rejects the empty sentence, whatever the order
        with pytest.raises(tpsurgery.InputError, match="mean pooling") as err:
            encode_schedules(emb, ["a b", ""], plans)
        assert err.value.index == 1
    assert torch.isfinite(encode_schedules(emb, ["a b", ""], [last]).values).all()
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: out * float("inf"))
    try:
        with pytest.warns(UserWarning, match="not finite"):
            reads = encode_schedules(emb, ["a b", "c"], [last, mean])
    finally:
        handle.remove()
    assert reads.non_finite == (0, 1)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
def test_sweep_errors_and_warnings_name_pairs_whatever_the_chunking():
    from tpsurgery.data import PairSet

    model, tok = tiny_model("llama", n_layers=2)
    pairs = load_stsb([SAMPLES], "test")
    b = list(pairs.b)
    b[6] = ""
    broken = PairSet(pairs.name, pairs.a, tuple(b), pairs.gold, pairs.subset, pairs.files)
    prompt = "prompt: 'x <PST> {text} y'\npooling: mean"
    for budget in (1.0, 1e-6):
        with pytest.raises(tpsurgery.InputError, match="stsb-test pair 6, sentence b: mean pooling") as err:
            run_sweep(model, prompt, broken, tokenizer=tok, memory_gb=budget)
        assert err.value.index == 6
    b[6], b[9] = "word " * 600, "word " * 700
    long = PairSet(pairs.name, pairs.a, tuple(b), pairs.gold, pairs.subset, pairs.files)
    with pytest.warns(UserWarning) as rec:
        run_sweep(model, prompt, long, tokenizer=tok, memory_gb=1e-6)
    cut = [str(w.message) for w in rec if "truncated" in str(w.message)]
    assert cut == [f"stsb-test: pairs 6, 9 have a sentence longer than the model's limit (512 tokens); it was "
                   "truncated"]
