"""The performance features change nothing but speed: prefix reuse, length buckets, early exit, the embedding cache.

Speed itself is measured by ``python benchmarks/run.py`` (docs/performance.md), never in tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpsurgery
from tpsurgery.testing import tiny_model
from tpsurgery.foreign import observer

KE = ('The essence of a sentence is often captured by its main subjects and actions. With this in mind , '
      'this sentence : <PST> "{text}" means in one word:"')
TEXTS = ["a b", "hello world, how are you", "x", "the cat sat on the mat", "hello world, how are you", "tiny"]
RECIPES = {
    "tp-last": {"prompt": KE, "tp": {"start": 1, "stop": 3}, "exit_layer": 3},
    "tp-mean-final": {"prompt": KE, "tp": {"start": 0, "stop": 4}, "exit_layer": -1, "pooling": "mean"},
    "hidden-gauss": {"prompt": KE, "tp": {"start": 0, "stop": 2}, "exit_layer": 3,
                     "placeholder": {"mask": "all", "init": "gaussian"}},
    "no-placeholder": {"prompt": "A long shared prompt before the sentence {text} means", "exit_layer": 2},
    "two-templates": {"prompt": [KE, 'In this task, you are given text. For this task, <PST> "{text}" is:"'],
                      "tp": {"start": 1, "stop": 2}, "exit_layer": 3},
}


def _pair(model, tok, recipe):
    on = tpsurgery.apply(model, recipe, tokenizer=tok)
    off = tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=False)
    return on, off


def _close(a, b, rel=1e-5):
    scale = max(float(np.abs(b).max()), 1e-6)
    assert float(np.abs(a - b).max()) <= rel * scale, float(np.abs(a - b).max())


CASES = [("llama", n) for n in RECIPES] + [("qwen2", "tp-last"), ("qwen2", "two-templates"),
                                           ("gemma3", "tp-mean-final"), ("gemma3", "hidden-gauss"),
                                           ("gpt2", "tp-last"), ("gpt2", "no-placeholder")]


@pytest.mark.parametrize("arch,name", CASES)
def test_prefix_reuse_gives_the_same_embeddings(arch, name):
    model, tok = tiny_model(arch)
    on, off = _pair(model, tok, RECIPES[name])
    a = on.encode(TEXTS, batch_size=3, all_layers=True)
    b = off.encode(TEXTS, batch_size=3, all_layers=True)
    assert on.stats.prefix_tokens_saved > 0 and off.stats.prefix_tokens_saved == 0
    _close(a, b)
    _close(on.encode(TEXTS[:2], batch_size=1), b[:2, -1])  # the stored prefix is reused, unchanged


def test_prefix_reuse_on_smollm2(smollm2):
    model, tok = smollm2
    on, off = _pair(model, tok, {"prompt": KE, "tp": {"start": 1, "stop": 6}, "exit_layer": 10})
    texts = ["A man is playing a guitar.", "Two dogs run.", "The stock market fell sharply on Monday."]
    a, b = on.encode(texts, batch_size=3), off.encode(texts, batch_size=3)
    assert on.stats.prefix_tokens_saved >= 3 * 20  # KE prompt prefix: ~40 tokens
    _close(a, b)


def test_sliding_window_layers_get_length_buckets_and_need_them():
    """Gemma3 (sliding window 6): pads between prefix and sentence would count toward the window."""
    model, tok = tiny_model("gemma3")
    on, off = _pair(model, tok, RECIPES["tp-last"])
    a, b = on.encode(TEXTS, batch_size=4), off.encode(TEXTS, batch_size=4)
    _close(a, b)
    assert on.stats.padding_waste == 0.0 and off.stats.padding_waste > 0.0  # buckets of one length: no pads

    # the same prefix with a padded batch is wrong for Gemma3 but exact for Llama: the buckets are what makes it exact
    for arch, should_match in (("gemma3", False), ("llama", True)):
        model, tok = tiny_model(arch)
        on, off = _pair(model, tok, RECIPES["tp-last"])
        rows = on.tokenize(TEXTS, KE)
        prefix = on._prefix(rows, on.plan)
        assert prefix.exact_length is not should_match
        rest = tpsurgery.prefix.split_rows(rows, prefix.length)
        idx, batch = next(on.batches(rest, len(rest), exact_length=False))
        padded = on.backend.run(on.plan, batch, prefix=prefix).numpy()
        ref = off.encode([TEXTS[i] for i in idx], batch_size=len(idx))
        gap = float(np.abs(padded - ref).max())
        assert (gap < 1e-4) is should_match, (arch, gap)


def _gemma3_with_window(window):
    from transformers import AutoModelForCausalLM

    from tpsurgery.testing import tiny_config, tiny_tokenizer

    cfg = tiny_config("gemma3")
    cfg.sliding_window = window
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), tiny_tokenizer()


def test_sliding_window_longer_than_the_sequence_keeps_padded_batches():
    """Prefix + rest within the window: the window covers every key, pads or not, so no length buckets are needed.
    One token less of window and the padded batch is wrong: the criterion is tight."""
    model, tok = tiny_model("gemma3")
    fit = max(len(r.ids) for r in tpsurgery.apply(model, RECIPES["tp-last"], tokenizer=tok).tokenize(TEXTS, KE))
    for window, exact in ((fit, True), (fit - 1, False)):
        model, tok = _gemma3_with_window(window)
        on, off = _pair(model, tok, RECIPES["tp-last"])
        prefix = on._prefix(on.tokenize(TEXTS, KE), on.plan)
        rest = tpsurgery.prefix.split_rows(on.tokenize(TEXTS, KE), prefix.length)
        assert prefix.needs_buckets(max(len(r.ids) for r in rest)) is not exact
        idx, batch = next(on.batches(rest, len(rest), exact_length=False))
        padded = on.backend.run(on.plan, batch, prefix=prefix).numpy()
        gap = float(np.abs(padded - off.encode([TEXTS[i] for i in idx], batch_size=len(idx))).max())
        assert (gap < 1e-4) is exact, (window, gap)
    model, tok = _gemma3_with_window(fit)
    on, off = _pair(model, tok, RECIPES["tp-last"])
    _close(on.encode(TEXTS, batch_size=4), off.encode(TEXTS, batch_size=4))
    assert on.stats.padding_waste > 0.0


def test_prefix_reuse_is_skipped_when_masks_are_edited():
    model, tok = tiny_model("llama")
    recipe = {**RECIPES["tp-last"], "placeholder": {"mask": "first_layer"}}
    on, off = _pair(model, tok, recipe)
    _close(on.encode(TEXTS), off.encode(TEXTS))
    assert on.stats.prefix_tokens_saved == 0


def _count_calls(model):
    """Forward PRE hooks (they fire even when nnsight stops the trace inside a module's output hook)."""
    spec = tpsurgery.arch.arch_for(model)
    layers = tpsurgery.arch.get_path(model, spec.layers)
    mods = {**{f"layer{i}": m for i, m in enumerate(layers)}, **{f"attn{i}": m.self_attn for i, m in enumerate(layers)},
            "norm": tpsurgery.arch.get_path(model, spec.norm),
            "lm_head": model.get_output_embeddings()}
    calls = dict.fromkeys(mods, 0)
    handles = [m.register_forward_pre_hook(observer(lambda mod, args, k=k: calls.__setitem__(k, calls[k] + 1)))
               for k, m in mods.items()]
    return calls, handles


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("exit_layer,runs", [(2, [1, 1, 0, 0]), (0, [0, 0, 0, 0]), (-1, [1, 1, 1, 1])])
def test_early_exit_runs_nothing_after_the_exit_layer(prefix_cache, exit_layer, runs, fast_path):
    model, tok = tiny_model("llama")
    recipe = {**RECIPES["tp-last"], "tp": {"start": 0, "stop": 4}, "exit_layer": exit_layer}
    emb = tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=prefix_cache)
    emb.backend.fast_path = fast_path  # the hook fast path (default) and the nnsight trace stop at the same place
    calls, handles = _count_calls(model)
    try:
        emb.encode(TEXTS[:1])  # computes (and stores) the prompt prefix, which runs once per template
        assert calls["lm_head"] == 0  # ... without the LM head
        calls.update(dict.fromkeys(calls, 0))
        emb.encode(TEXTS, batch_size=2)  # 5 unique texts -> 3 batches
    finally:
        for h in handles:
            h.remove()
    n = 3
    assert [calls[f"attn{i}"] for i in range(4)] == [n * r for r in runs]  # decoder layer i did its work
    m = {2: 2, 0: 0, -1: 4}[exit_layer]
    assert [calls[f"layer{i}"] for i in range(max(m, 1), 4)] == [0] * (4 - max(m, 1))  # later layers never entered
    assert calls["norm"] == (n if exit_layer == -1 else 0)
    assert calls["lm_head"] == 0


def test_length_buckets_dedup_and_padding_waste():
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, {"prompt": None, "exit_layer": 2}, tokenizer=tok, prefix_cache=False)
    texts = ["aaaa", "b", "aaab", "bb", "b"]  # lengths 4 1 4 2 (1 again: a duplicate)
    emb.encode(texts, batch_size=2)
    # sorted by length: [4, 4] then [2, 1]: 11 real tokens of 12 computed; 4 unique rows
    assert (emb.stats.rows, emb.stats.batches, emb.stats.tokens, emb.stats.padded_tokens) == (4, 2, 11, 12)
    rows = emb.tokenize(["aaaa", "b", "aaab", "bb", "cc"], "{text}")
    sizes = [(batch.size, int((batch.attention_mask == 0).sum())) for _, batch in emb.batches(rows, 8, exact_length=True)]
    assert sizes == [(2, 0), (2, 0), (1, 0)]


def test_embedding_cache_is_instant_and_never_stale(tmp_path):
    model, tok = tiny_model("qwen2")
    recipe = RECIPES["tp-last"]
    first = tpsurgery.apply(model, recipe, tokenizer=tok, embedding_cache=tmp_path, prefix_cache=False)
    ref = first.encode(TEXTS)
    fresh = tpsurgery.apply(model, recipe, tokenizer=tok, embedding_cache=tmp_path, prefix_cache=False)
    calls, handles = _count_calls(model)
    try:
        again = fresh.encode(TEXTS)
        assert calls["layer0"] == 0 and np.array_equal(again, ref)  # nothing ran
        fresh.encode(TEXTS + ["new one"])
        assert calls["layer0"] == 1  # only the new text
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight, in place
        calls["layer0"] = 0
        changed = fresh.encode(TEXTS)
        assert calls["layer0"] > 0 and not np.array_equal(changed, ref)
        _close(changed, tpsurgery.apply(model, recipe, tokenizer=tok).encode(TEXTS))
    finally:
        for h in handles:
            h.remove()
    other = tpsurgery.apply(model, {**recipe, "exit_layer": 2}, tokenizer=tok, embedding_cache=tmp_path)
    assert not np.allclose(other.encode(TEXTS), changed)
    layers = other.encode(TEXTS, all_layers=True)
    assert layers.shape == (6, 3, 32) and np.array_equal(other.encode(TEXTS, all_layers=True), layers)


def test_prefix_reuse_defaults_on_for_cpu_models_and_can_be_turned_off():
    import tpsurgery
    from tpsurgery.testing import tiny_model

    model, tok = tiny_model("llama")
    rec = {"prompt": 'This sentence : <PST> "{text}" means', "tp": {"start": 0, "stop": 2}, "exit_layer": 2}
    auto = tpsurgery.apply(model, rec, tokenizer=tok)
    off = tpsurgery.apply(model, rec, tokenizer=tok, prefix_cache=False)
    a, b = auto.encode(["one", "two words"]), off.encode(["one", "two words"])
    assert auto.stats.prefix_tokens_saved > 0 and off.stats.prefix_tokens_saved == 0
    assert abs(a - b).max() <= 1e-5 * abs(b).max()
