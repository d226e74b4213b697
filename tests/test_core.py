"""The core promise: the nnsight engine computes exactly what the recipe says, on any batch, without touching the model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tpsurgery
from tpsurgery.prompts import encode_prompts
from tpsurgery.testing import tiny_model

from recipe_oracle import oracle_embed
from tpsurgery.foreign import observer

def assert_rel_close(got, want, tol=1e-5):
    """Max abs difference relative to the largest magnitude of the reference, row by row (float32 rounding)."""
    got, want = (torch.as_tensor(np.ascontiguousarray(x)) if not isinstance(x, torch.Tensor) else x for x in (got, want))
    assert got.shape == want.shape
    rel = (got - want).abs().amax(-1) / want.abs().amax(-1).clamp(min=1e-12)
    assert rel.max().item() <= tol, f"relative error {rel.max().item():.2e} > {tol:.0e}"


TEXTS = ["A man is playing a guitar.", "hi", "Someone plays music?", 'She said "yes" and left', "x y z " * 6]
P = 'This sentence : <PST> "{text}" means in one word:"'
RECIPES = {
    "prompteol-last": {"prompt": 'This sentence : "{text}" means in one word:"'},
    "tp-1-2-exit": {"prompt": P, "tp": {"start": 1, "stop": 2}, "exit_layer": -2},
    "tp-0-all-final": {"prompt": P, "tp": {"start": 0, "stop": 4}, "exit_layer": -1},
    "tp-zeros": {"prompt": P, "tp": {"start": 1, "stop": 3}, "exit_layer": 3, "placeholder": {"init": "zeros"}},
    "tp-gauss-alpha": {"prompt": P, "tp": {"start": 0, "stop": 2, "alpha": 0.3}, "exit_layer": 3,
                       "placeholder": {"init": "gaussian", "seed": 3}},
    "tp-resume-mean": {"prompt": P, "tp": {"spans": [{"start": 0, "stop": 1}], "resume": 2}, "pooling": "mean"},
    "two-placeholders": {"prompt": '<PST> This sentence : <PST> "{text}" means', "tp": {"start": 1, "stop": 3},
                         "exit_layer": 2, "tp_source": None},
    "source-2": {"prompt": P, "tp": {"start": 1, "stop": 3, "source": -2}, "exit_layer": 4},
    "metaeol-like": {"prompt": [P, 'In one word, <PST> "{text}" is:"'], "tp": {"start": 1, "stop": 2}, "exit_layer": 3},
}
for r in RECIPES.values():
    r.pop("tp_source", None)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_engine_equals_forward_hook_oracle(arch, name):
    model, tok = tiny_model(arch, bos=(arch == "llama"))
    recipe = tpsurgery.parse_recipe(RECIPES[name])
    emb = tpsurgery.apply(model, recipe, tokenizer=tok)
    got = emb.encode(TEXTS, batch_size=3, convert_to_tensor=True)
    want = oracle_embed(emb, TEXTS)  # one sentence at a time, unpadded, plain forward-pre-hooks
    assert_rel_close(got, want)


def test_engine_equals_oracle_on_smollm2(smollm2):
    model, tok = smollm2
    for rec in ({"prompt": P, "tp": {"start": 1, "stop": 2}, "exit_layer": 28},
                {"prompt": P, "tp": {"start": 1, "stop": 4}, "exit_layer": 28, "placeholder": {"init": "zeros"}},
                {"prompt": 'This sentence : "{text}" means in one word:"', "exit_layer": -1}):
        recipe = tpsurgery.parse_recipe(rec)
        emb = tpsurgery.apply(model, recipe, tokenizer=tok)
        got = emb.encode(TEXTS[:4], batch_size=4, convert_to_tensor=True)
        want = oracle_embed(emb, TEXTS[:4])
        assert_rel_close(got, want)


def test_tp_sequence_is_prompteol_plus_one_token(smollm2):
    _, tok = smollm2
    texts = ["A man plays a guitar.", "Why?", ""]
    plain = encode_prompts(tok, 'This sentence : "{text}" means in one word:"', texts, 0, preprocess=True)
    tp = encode_prompts(tok, P, texts, 0, preprocess=True)
    for a, b in zip(plain, tp):
        (p,) = b.placeholders
        assert b.ids[:p] + b.ids[p + 1:] == a.ids
        assert tok.convert_ids_to_tokens(list(b.ids[:p])) == ["This", "Ġsentence", "Ġ:"]


def test_hidden_placeholder_with_empty_schedule_is_exactly_prompteol(smollm2):
    model, tok = smollm2
    plain = tpsurgery.apply(model, {"prompt": 'This sentence : "{text}" means in one word:"', "exit_layer": 28},
                            tokenizer=tok).encode(TEXTS[:3])
    hidden = tpsurgery.apply(model, {"prompt": P, "exit_layer": 28, "placeholder": {"mask": "all"}},
                             tokenizer=tok).encode(TEXTS[:3])
    visible = tpsurgery.apply(model, {"prompt": P, "exit_layer": 28}, tokenizer=tok).encode(TEXTS[:3])
    assert_rel_close(hidden, plain)
    assert np.abs(visible - plain).max() > 1e-2  # the visible placeholder does change the embedding


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        copy.deepcopy(model.config.to_dict()),
        [(n, type(m).__name__, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()],
    )


def _assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1]
    assert [(n, t, list(f), list(p)) for n, t, f, p in a[2]] == [(n, t, list(f), list(p)) for n, t, f, p in b[2]]


def test_apply_and_encode_leave_model_and_tokenizer_untouched():
    model, tok = tiny_model("llama")
    tok.padding_side = "right"
    before = _snapshot(model)
    emb = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 0, "stop": 3}, "exit_layer": 3,
                                  "placeholder": {"init": "gaussian"}}, tokenizer=tok)
    emb.encode(TEXTS, batch_size=2)
    with pytest.raises(tpsurgery.InputError):
        emb.encode(["ok", None])
    _assert_same(before, _snapshot(model))
    assert tok.padding_side == "right"


def test_model_untouched_after_an_error_inside_the_trace():
    model, tok = tiny_model("qwen2")
    before = _snapshot(model)
    emb = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 0, "stop": 2}, "exit_layer": 3}, tokenizer=tok)
    calls = {"n": 0}

    def boom(mod, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")

    h = model.model.layers[1].register_forward_pre_hook(observer(boom))
    try:
        with pytest.raises(tpsurgery.BackendError, match="injected failure"):
            emb.encode(TEXTS, batch_size=2)
    finally:
        h.remove()
    _assert_same(before, _snapshot(model))
    assert emb.encode(TEXTS, batch_size=2).shape == (5, 32)  # and it still works


def test_batch_composition_does_not_change_an_embedding():
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 1, "stop": 3}, "exit_layer": 3}, tokenizer=tok)
    alone = np.stack([emb.encode(t) for t in TEXTS])
    for bs in (1, 2, 5):
        assert_rel_close(emb.encode(TEXTS[::-1], batch_size=bs)[::-1], alone)


def test_encode_follows_sentence_transformers_conventions():
    model, tok = tiny_model("gpt2")
    emb = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 0, "stop": 2}, "exit_layer": 2}, tokenizer=tok)
    one = emb.encode("hello")
    many = emb.encode(["hello", "world", "hello"])
    assert one.shape == (32,) and one.dtype == np.float32
    assert many.shape == (3, 32) and np.array_equal(many[0], many[2]) and np.allclose(many[0], one, atol=1e-6)
    t = emb.encode(["hello"], convert_to_tensor=True, normalize_embeddings=True)
    assert isinstance(t, torch.Tensor) and torch.allclose(t.norm(dim=-1), torch.ones(1))
    assert emb.encode([]).shape == (0, 32)
    layers = emb.encode(["hello", "world"], all_layers=True)
    assert layers.shape == (2, 3, 32) and np.allclose(layers[:, -1], many[:2], atol=1e-6)
    with pytest.raises(tpsurgery.InputError, match="input 1: expected a str, got int"):
        emb.encode(["a", 3])
    with pytest.raises(tpsurgery.InputError, match="batch_size"):
        emb.encode(["a"], batch_size=0)


def test_bf16_model_returns_float32():
    model, tok = tiny_model("llama", dtype=torch.bfloat16)
    out = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 0, "stop": 2}, "exit_layer": 2}, tokenizer=tok).encode(["a"])
    assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("exit_layer,expected", [(0, 0), (2, 2), (4, 4), (-1, 4), (-2, 3), (-5, 0)])
def test_exit_layer_reads_hf_hidden_states_index(exit_layer, expected):
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, {"prompt": 'Say "{text}"', "exit_layer": exit_layer}, tokenizer=tok)
    assert emb.plan.exit_layer == expected
    ids = torch.tensor([emb.tokenize(["a b"], 'Say "{text}"')[0].ids])
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[expected][0, -1]
    torch.testing.assert_close(emb.encode("a b", convert_to_tensor=True), want, rtol=1e-5, atol=1e-6)


def test_exit_layer_out_of_range_names_the_layer_count():
    model, tok = tiny_model("llama")
    with pytest.raises(tpsurgery.RecipeError, match=r"exit_layer.*4 decoder layers"):
        tpsurgery.apply(model, {"exit_layer": 5}, tokenizer=tok)
    with pytest.raises(tpsurgery.RecipeError, match=r"tp.spans.0.*exceeds the model's 4 decoder layers"):
        tpsurgery.apply(model, {"prompt": P, "tp": {"start": 2, "stop": 9}}, tokenizer=tok)


def test_explain_shows_tokens_placeholders_schedule_and_exit():
    model, tok = tiny_model("llama")
    text = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 1, "stop": 3}, "exit_layer": 3},
                           tokenizer=tok).explain("ab")
    assert "[<PST>#16]" in text and "placeholder positions: [16]" in text
    assert "layers 1-2: TP layer input" in text and "layer 0: plain" in text and "read hidden_states[3]" in text
    assert len(text.splitlines()) <= 10  # layer ranges, not one line per layer


def test_apply_accepts_nnsight_wrappers_and_rejects_other_objects():
    import nnsight

    model, tok = tiny_model("llama")
    rec = {"prompt": P, "tp": {"start": 0, "stop": 2}, "exit_layer": 2}
    direct = tpsurgery.apply(model, rec, tokenizer=tok).encode(TEXTS)
    wrapped = tpsurgery.apply(nnsight.NNsight(model), rec, tokenizer=tok).encode(TEXTS)
    np.testing.assert_array_equal(direct, wrapped)
    with pytest.raises(tpsurgery.ModelError, match="Accepted: a transformers causal LM"):
        tpsurgery.apply(object(), rec)
    with pytest.raises(tpsurgery.ModelError, match="pass tokenizer="):
        tpsurgery.apply(model, rec)


@pytest.mark.parametrize("fast_path", [True, False])
def test_closing_the_embedder_leaves_the_model_object_exactly_as_it_was(fast_path):
    model, tok = tiny_model("llama")
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    rec = {"prompt": P, "tp": {"start": 0, "stop": 2}, "exit_layer": 3}
    with tpsurgery.apply(model, rec, tokenizer=tok) as emb:
        emb.backend.fast_path = fast_path
        first = emb.encode(TEXTS)
        # nnsight wraps while in use; the hook fast path never wraps, and leaves no hook behind
        assert any("__nnsight__" in vars(m) for m in model.modules()) != fast_path
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    after = {n: dict(vars(m)) for n, m in model.named_modules()}
    assert after.keys() == before.keys()
    for n in before:
        assert after[n].keys() == before[n].keys(), n
        assert all(after[n][k] is before[n][k] for k in before[n] if k not in ("_parameters", "_buffers", "_modules")), n
    np.testing.assert_array_equal(emb.encode(TEXTS), first)  # usable again after close (wraps anew)
    emb.close()
    with pytest.raises(tpsurgery.InputError):
        with tpsurgery.apply(model, rec, tokenizer=tok) as emb2:
            emb2.encode([None])
    assert not any("__nnsight__" in vars(m) or "forward" in vars(m) for m in model.modules())
