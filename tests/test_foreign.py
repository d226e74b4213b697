"""Issue 22.1: a model that carries foreign PyTorch hooks or nnsight edits gets one embedding on every path (nnsight
trace, hook fast path, resumed sweep parts, prefix reuse on or off), or a clear error (TransformerLens on a copy, edits
on a child envoy, ``encode`` inside a user's trace); the embedding cache never answers for a hooked model.

The property draws tiny models of every family (tpsurgery.testing.ARCHS), random recipes and one or two random foreign
interventions: forward pre-hooks, forward hooks, a global module hook, nnsight edits in place or on an edited copy.
"""

from __future__ import annotations

import nnsight
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tpsurgery
from strategies import engine_recipes, scaled
from tpsurgery.arch import arch_for, get_path
from tpsurgery.errors import ModelError, TpsurgeryError
from tpsurgery.foreign import carried, observer
from tpsurgery.sharing import encode_schedules
from tpsurgery.testing import ARCHS, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N_LAYERS = 3
TEXTS = ["a b c", "hello there", "x"]
R = "prompt: 'This sentence : <PST> {text} means'\ntp: {start: 1, stop: 3}\nexit_layer: 3"


def _first(h):
    return h[0] if isinstance(h, tuple) else h


def _install(kind, model, lm, layer, factor):
    """One foreign intervention; returns what undoes it (nnsight edits: nothing, the envoy is thrown away)."""
    spec = arch_for(model)
    target = get_path(model, spec.layers)[layer]
    if kind == "pre":
        return target.register_forward_pre_hook(lambda m, args: (args[0] * factor, *args[1:])).remove
    if kind == "post":
        def post(m, args, out):
            return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
        return target.register_forward_hook(post).remove
    if kind == "embed":
        return get_path(model, spec.embed).register_forward_hook(lambda m, args, out: out + factor).remove
    if kind == "global":
        def pre(m, args):
            return (args[0] + factor, *args[1:]) if m is target else None
        return torch.nn.modules.module.register_module_forward_pre_hook(pre).remove
    envoy_layer = get_path(lm, spec.layers)[layer]
    if kind == "edit":
        with lm.edit(inplace=True):
            envoy_layer.input = envoy_layer.input * factor
        return lambda: None
    raise AssertionError(kind)


def _outcome(fn):
    try:
        return np.asarray(fn())
    except TpsurgeryError as exc:
        return type(exc).__name__


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.shape == b.shape and np.allclose(a, b, atol=1e-5, rtol=1e-4)


@scaled(0.08)
@given(data=st.data())
def test_every_path_gives_one_embedding_on_a_model_with_hooks_or_edits(data):
    arch = data.draw(st.sampled_from(ARCHS), label="arch")
    model, tok = tiny_model(arch, n_layers=N_LAYERS)  # fresh: hooks and nnsight wrappers never leak between examples
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(n_layers=N_LAYERS, surgery=True), label="recipe"))
    kinds = data.draw(st.lists(st.sampled_from(["pre", "post", "embed", "global", "edit"]), min_size=1, max_size=2),
                      label="kinds")
    copy = data.draw(st.booleans(), label="edited copy") if "edit" in kinds else False
    lm = nnsight.NNsight(model) if "edit" in kinds else None
    undo = [_install(k, model, lm, data.draw(st.integers(0, N_LAYERS - 1), label="layer"),
                     data.draw(st.sampled_from([0.0, 0.5, 2.0]), label="factor")) for k in kinds]
    subject = lm if lm is not None else model
    if copy:  # the edits stored on the copy that lm.edit() returns; lm itself is left clean
        edits, lm._edits = lm._edits, []
        subject = lm._shallow_copy()
        subject._edits = edits
    try:
        assert carried(model, subject if lm is not None else None).any
        emb = tpsurgery.apply(subject, recipe, tokenizer=tok)
        m = emb.plan.exit_layer
        fast = _outcome(lambda: emb.encode(TEXTS))
        no_prefix = _outcome(lambda: tpsurgery.apply(subject, recipe, tokenizer=tok, prefix_cache=False).encode(TEXTS))
        emb.backend.fast_path = False
        traced = _outcome(lambda: tpsurgery.apply(subject, recipe, tokenizer=tok, prefix_cache=True).encode(TEXTS))
        resumed = _outcome(lambda: encode_schedules(emb, TEXTS, [emb.plan], batch_size=2)[0, m])
        assert _same(fast, traced), "the fast path and the trace differ"
        assert _same(fast, no_prefix), "prompt-prefix reuse changes the embedding"
        assert _same(fast, resumed), "a sweep's resumed parts differ from encode"
        with pytest.raises(ModelError, match="transformer_lens"):
            tpsurgery.apply(subject, recipe, tokenizer=tok, backend="transformer_lens")
    finally:
        for u in undo:
            u()


def test_nnsight_edits_are_honoured_in_place_and_on_the_edited_copy():
    model, tok = tiny_model("llama", n_layers=4)
    bare = tpsurgery.apply(model, R, tokenizer=tok).encode(TEXTS)
    lm = nnsight.NNsight(model)
    with lm.edit(inplace=True):
        lm.model.layers[1].mlp.output[:] = 0
    want = _outcome(lambda: _traced(lm, tok))
    got = tpsurgery.apply(lm, R, tokenizer=tok).encode(TEXTS)  # the default fast path dropped them (issue 22)
    assert np.abs(got - bare).max() > 1e-4 and _same(got, want)
    lm.clear_edits()
    with lm.edit() as (_, edited):
        edited.model.layers[1].mlp.output[:] = 0
    assert _same(tpsurgery.apply(edited, R, tokenizer=tok).encode(TEXTS), want)
    assert _same(tpsurgery.apply(lm, R, tokenizer=tok).encode(TEXTS), bare)  # lm itself stays unedited


def _traced(subject, tok):
    emb = tpsurgery.apply(subject, R, tokenizer=tok, prefix_cache=False)
    emb.backend.fast_path = False
    return emb.encode(TEXTS)


def test_edits_on_a_child_envoy_are_refused_not_dropped():
    model, tok = tiny_model("llama", n_layers=4)
    lm = nnsight.NNsight(model)
    layer = lm.model.layers[1]
    with layer.edit(inplace=True):
        layer.output[0][:] = 0
    with pytest.raises(ModelError, match="child envoy"):
        tpsurgery.apply(lm, R, tokenizer=tok).encode(TEXTS)


def test_the_embedding_cache_never_answers_for_a_hooked_model(tmp_path):
    model, tok = tiny_model("llama", n_layers=4)
    emb = tpsurgery.apply(model, R, tokenizer=tok, embedding_cache=tmp_path)
    before = emb.encode(TEXTS)
    h = model.model.layers[1].register_forward_pre_hook(lambda m, args: (args[0] + 1.0, *args[1:]))
    try:
        with pytest.warns(UserWarning, match="embedding cache is not used.*forward pre-hook"):
            hooked = emb.encode(TEXTS)
        assert _same(hooked, tpsurgery.apply(model, R, tokenizer=tok).encode(TEXTS))
        assert np.abs(hooked - before).max() > 1e-3  # the stale cached result is not returned
    finally:
        h.remove()
    hits = emb.embedding_cache.hits
    assert _same(emb.encode(TEXTS), before) and emb.embedding_cache.hits == hits + len(TEXTS)


def test_observer_hooks_keep_the_fast_path_and_the_cache(tmp_path):
    model, tok = tiny_model("llama", n_layers=4)
    emb = tpsurgery.apply(model, R, tokenizer=tok, embedding_cache=tmp_path)
    seen = []
    h = model.model.layers[1].register_forward_hook(observer(lambda m, args, out: seen.append(1)))
    try:
        emb.encode(TEXTS)
        emb.encode(TEXTS)
    finally:
        h.remove()
    assert emb.backend._envoy is None and seen  # no nnsight trace was needed; the hook fired
    assert emb.embedding_cache.hits == len(TEXTS)


def test_transformers_own_output_capturing_hooks_do_not_count():
    model, tok = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert not carried(model).any


def test_encode_inside_a_user_trace_is_a_clear_error_and_a_session_works():
    model, tok = tiny_model("llama", n_layers=4)
    lm = nnsight.NNsight(model)
    emb = tpsurgery.apply(lm, R, tokenizer=tok)
    want = emb.encode(TEXTS)
    outcome = None
    with lm.trace(input_ids=torch.tensor([[1, 2, 3]])):
        h = lm.model.layers[0].output.save()
        outcome = nnsight.save(_outcome(lambda: emb.encode(TEXTS)))
    assert outcome == "TpsurgeryError" and h is not None
    with pytest.raises(TpsurgeryError, match="inside the body of an nnsight"):
        with lm.trace(input_ids=torch.tensor([[1, 2, 3]])):
            lm.model.layers[0].output.save()
            emb.encode(TEXTS)
    got = None
    with lm.session():
        got = nnsight.save(emb.encode(TEXTS))
    assert _same(got, want)


def test_transformer_lens_on_a_copy_refuses_hooks_added_after_apply():
    model, tok = tiny_model("llama", n_layers=2)
    emb = tpsurgery.apply(model, "prompt: '<PST> {text}'", tokenizer=tok, backend="transformer_lens")
    h = model.model.layers[0].register_forward_pre_hook(lambda m, args: (args[0] * 2, *args[1:]))
    try:
        with pytest.raises(ModelError, match="copy of the model.*forward pre-hook"):
            emb.encode(TEXTS)
    finally:
        h.remove()
    assert emb.encode(TEXTS).shape == (len(TEXTS), 32)


def test_a_users_bridge_honours_its_hooks_and_caches_without_them(tmp_path):
    model, tok = tiny_model("llama", n_layers=4)
    bridge = tpsurgery.apply(model, {}, tokenizer=tok, backend="transformer_lens").backend.bridge
    emb = tpsurgery.apply(bridge, R, tokenizer=tok, embedding_cache=tmp_path)
    bare = emb.encode(TEXTS)  # TransformerLens wires its own capture hooks on this first run: they do not count
    h = bridge.blocks[1].hook_resid_pre.register_forward_hook(lambda m, args, out: out * 2)
    try:
        with pytest.warns(UserWarning, match="embedding cache is not used"):
            assert np.abs(emb.encode(TEXTS) - bare).max() > 1e-3
    finally:
        h.remove()
    assert _same(emb.encode(TEXTS), bare) and emb.embedding_cache.hits == len(TEXTS)
