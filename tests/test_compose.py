"""Inside your own trace (tpsurgery.compose, issue 22 item 2): what a user saves inside ``emb.trace(texts)`` equals
what a plain-PyTorch-hook oracle sees under the same recipe, ``run.embeddings`` equals ``encode``, a user's own edit
in the body acts like the same edit done by a plain hook, the TransformerLens ``fwd_hooks`` do the same, and every
misuse gets a clear error.

Oracles: ``recipe_oracle.hidden_for_row`` (TP, initial vectors, mask edits; one unpadded sentence, HF
``output_hidden_states``) and ``edit_oracle.reference_read`` (edit lists: copy, scale, subtract of an auxiliary run at
``attn_out_in``), both written from the recipe's own fields; the trace's padded rows are compared unpadded.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st

import tpsurgery
from tpsurgery.errors import BackendError, InputError, TpsurgeryError
from tpsurgery.testing import tiny_model

from edit_oracle import reference_read
from prop_support import decoder_parts
from recipe_oracle import hidden_for_row, oracle_embed

FAMILIES = ("llama", "gpt2", "qwen2", "falcon")  # falcon: decoder layers return tuples
TEXTS = ["a b", "c d e f", "gh"]
N = 4


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, n_layers=N) for arch in FAMILIES}


def _apply(models, arch, recipe, **kw):
    model, tok = models[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tpsurgery.apply(model, recipe, tokenizer=tok, **kw)


def _saved_hidden(emb, texts):
    """``hidden_states[1..n]`` saved by a user inside ``emb.trace`` (and the run)."""
    saved: list = []  # filled in the body (a list made there would not come back: nnsight returns saved values)
    with torch.no_grad():
        with emb.trace(texts) as run:
            for j in range(1, N + 1):
                saved.append(run.hidden_state(j).save())
    return saved, run


def _unpadded(t, b, length):
    return t[b, t.shape[1] - length:]


def _close(a, b, tol=1e-4):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


# ---------------------------------------------------------------------------------------- saves vs a hook oracle
@settings(max_examples=8)
@given(arch=st.sampled_from(FAMILIES), start=st.integers(0, 2), length=st.integers(1, 2), exit_layer=st.integers(1, N),
       init=st.sampled_from(["token", "ones"]), mask=st.sampled_from(["none", "first_layer", "bidirectional"]))
def test_saves_inside_the_trace_equal_the_hook_oracle(models, arch, start, length, exit_layer, init, mask):
    recipe = {"prompt": "This sentence : <PST> {text} means", "tp": {"start": start, "stop": start + length},
              "placeholder": {"init": init}, "exit_layer": exit_layer}
    if mask == "first_layer":
        recipe["placeholder"]["mask"] = "first_layer"
    elif mask == "bidirectional":
        recipe["attention"] = {"bidirectional": "sentence", "layers": {"start": 0, "stop": 2}}
    emb = _apply(models, arch, yaml.safe_dump(recipe))
    saved, run = _saved_hidden(emb, TEXTS)
    for b, row in enumerate(emb.tokenize(TEXTS, emb.recipe.templates[0])):
        want = hidden_for_row(emb.model, row, emb.recipe, exit_layer)  # the recipe restated with plain hooks
        for j in range(1, N + 1):
            assert _close(_unpadded(saved[j - 1], b, len(row.ids)), want[j][0]), (arch, b, j)
    assert np.allclose(run.embeddings.numpy(), oracle_embed(emb, TEXTS).numpy(), atol=1e-4)
    assert np.allclose(run.embeddings.numpy(), emb.encode(TEXTS), atol=1e-5)


EDITS = {  # oracle-format edit lists (edit_oracle); the recipe is written from the same dicts
    "scale": [{"site": "layer_in", "layer": 1, "op": "copy", "rows": "placeholders", "source": -1, "alpha": 1.0},
              {"site": "attn_out_in", "layer": 2, "op": "scale", "rows": "last", "factor": 0.5}],
    "cp": [{"site": "attn_out_in", "layer": 1, "op": "subtract", "rows": "last", "run": "irrelevant"},
           {"site": "attn_out_in", "layer": 1, "op": "scale", "rows": "last", "factor": 0.5}],
}
AUX = "The irrelevant information of : {text} means"


def _edit_recipe(kind: str) -> str:
    edits = [{("layers" if k == "layer" else k): v for k, v in e.items()} for e in EDITS[kind]]
    recipe = {"prompt": "This sentence : <PST> {text} means", "edits": edits, "exit_layer": N - 1}
    if kind == "cp":
        recipe["runs"] = {"irrelevant": AUX}
    return yaml.safe_dump(recipe)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", sorted(EDITS))
def test_edit_lists_inside_the_trace_equal_the_edit_oracle(models, arch, kind):
    emb = _apply(models, arch, _edit_recipe(kind))
    saved, run = _saved_hidden(emb, TEXTS)
    aux = emb.tokenize(TEXTS, AUX) if kind == "cp" else None
    for b, row in enumerate(emb.tokenize(TEXTS, emb.recipe.templates[0])):
        runs = {"irrelevant": list(aux[b].ids)} if aux else None
        for j in (2, 3, N):  # before, at and after the exit layer (N - 1): the trace runs to the end
            want = reference_read(emb.model, list(row.ids), list(row.placeholders), EDITS[kind], j, runs, row.text_span)
            assert _close(_unpadded(saved[j - 1], b, len(row.ids)), want), (kind, b, j)
    assert np.allclose(run.embeddings.numpy(), emb.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("recipe", [
    "prompt: '<PST> {text} means'\ntp: {start: 0, stop: 2}\npooling: mean\nexit_layer: -1",
    "prompt: '<PST> {text} means'\ntp: {start: 1, stop: 3}\npooling: {tokens: last, layers: [2, 4]}",
    "prompt: ['A <PST> {text} means', 'B {text} is']\ntp: {start: 1, stop: 2}\nexit_layer: 3",
])
def test_embeddings_equal_encode(models, recipe):
    emb = _apply(models, "llama", recipe)
    k = len(emb.recipe.templates)
    got = []
    for t in range(k):
        with torch.no_grad():
            with emb.trace(TEXTS, template=t if k > 1 else None) as run:
                pass
        got.append(run.embeddings)
    assert np.allclose(torch.stack(got).mean(0).numpy(), emb.encode(TEXTS), atol=1e-5)


# ------------------------------------------------------------------------------------ the user's own interventions
def test_a_user_edit_in_the_body_acts_like_the_same_plain_hook(models):
    for arch in ("llama", "falcon"):
        emb = _apply(models, arch, "prompt: 'This sentence : <PST> {text} means'\ntp: {start: 1, stop: 3}\n"
                                   "exit_layer: 3")
        with torch.no_grad():
            with emb.trace(TEXTS) as run:
                run.layers[1].mlp.output = run.layers[1].mlp.output * 0.5
                last = run.hidden_state(3).save()
        plain = emb.encode(TEXTS)
        mlp = decoder_parts(emb.model)[0][1].mlp
        handle = mlp.register_forward_hook(lambda mod, args, out: out * 0.5)  # the same edit, a plain hook
        try:
            want = oracle_embed(emb, TEXTS)
            hooked = emb.encode(TEXTS)
        finally:
            handle.remove()
        assert float(np.abs(want.numpy() - plain).max()) > 1e-3  # the edit changes the embedding
        assert np.allclose(run.embeddings.numpy(), want.numpy(), atol=1e-4), arch
        assert np.allclose(run.embeddings.numpy(), hooked, atol=1e-5), arch
        assert torch.allclose(last[:, run.last].float(), run.embeddings, atol=1e-6)


def test_the_user_sees_the_recipes_edit_at_the_same_point_and_in_place_writes_after_the_read_do_not_reach_it(models):
    emb = _apply(models, "llama", "prompt: 'This sentence : <PST> {text} means'\ntp: {start: 1, stop: 3}\n"
                                  "exit_layer: 3")
    with torch.no_grad():
        with emb.trace(TEXTS) as run:
            x = run.layers[1].input.save()   # after TP of layer 1: the placeholder row is the last row
            run.layers[2].output[:] = 0      # in place, after the recipe read hidden_states[3] here
    ph = run.batch.placeholders
    for b in range(len(TEXTS)):
        assert torch.equal(x[b, ph[b, 0]], x[b, run.last])
    assert np.allclose(run.embeddings.numpy(), emb.encode(TEXTS), atol=1e-5)


def test_batch_views(models):
    emb = _apply(models, "llama", "prompt: 'X <PST> {text} Y'\ntp: {start: 1, stop: 2}\nexit_layer: 2")
    with emb.trace(TEXTS) as run:
        pass
    rows = emb.tokenize(TEXTS, emb.recipe.templates[0])
    width = max(len(r.ids) for r in rows)
    for b, r in enumerate(rows):
        off = width - len(r.ids)
        assert run.sentence[b] == (off + r.text_span[0], off + r.text_span[1])
        assert run.batch.placeholders[b].tolist() == [off + p for p in r.placeholders]
        assert run.batch.input_ids[b, off:].tolist() == list(r.ids)
    assert run.last == width - 1


# ------------------------------------------------------------------------------------------------ TransformerLens
@pytest.mark.parametrize("kind", ["tp", "cp"])
def test_transformer_lens_fwd_hooks_equal_encode_and_the_oracle(models, kind):
    recipe = _edit_recipe("cp") if kind == "cp" else \
        "prompt: 'This sentence : <PST> {text} means'\ntp: {start: 1, stop: 3}\nexit_layer: 3"
    tl = _apply(models, "llama", recipe, backend="transformer_lens")
    run = tl.hooks(TEXTS)
    seen = {}

    def mine(t, hook):
        seen["h"] = t.clone()

    with torch.no_grad():
        run.bridge.run_with_hooks(**run.inputs, fwd_hooks=run.fwd_hooks + [("blocks.1.hook_resid_post", mine)],
                                  return_type=None)
    assert np.allclose(run.embeddings.numpy(), tl.encode(TEXTS), atol=1e-5)
    nn = _apply(models, "llama", recipe)
    saved, _ = _saved_hidden(nn, TEXTS)
    real = run.batch.attention_mask.bool()  # hidden_states[2] under the recipe as the nnsight trace saw it (not pads)
    assert _close(seen["h"][real], saved[1][real], 1e-5)
    with pytest.raises(BackendError, match="more than once"):
        run.bridge.run_with_hooks(**run.inputs, fwd_hooks=run.fwd_hooks, return_type=None)
        run.embeddings


# ------------------------------------------------------------------------------------------------------- refusals
def test_encode_inside_the_trace_and_a_trace_inside_a_users_trace_are_clear_errors(models):
    emb = _apply(models, "llama", "prompt: '<PST> {text}'\ntp: {start: 1, stop: 2}\nexit_layer: 2")
    with pytest.raises(TpsurgeryError, match="cannot run inside the body of an nnsight"):
        with emb.trace(TEXTS):
            emb.encode(TEXTS)
    lm = emb.backend.envoy
    with pytest.raises(TpsurgeryError, match="cannot run inside the body of an nnsight"):
        with lm.trace(input_ids=torch.tensor([[1, 2, 3]])):
            emb.trace(TEXTS)
    with pytest.raises(TpsurgeryError, match="cannot run inside the body of an nnsight"):
        with lm.trace(input_ids=torch.tensor([[1, 2, 3]])):
            emb.encode(TEXTS)


def test_misuse_is_refused_with_what_to_do(models):
    nn = _apply(models, "llama", "prompt: ['A <PST> {text}', 'B {text}']\ntp: {start: 1, stop: 2}\nexit_layer: 2")
    with pytest.raises(InputError, match="template=0..1"):
        nn.trace(TEXTS)
    with pytest.raises(InputError, match="template=2"):
        nn.trace(TEXTS, template=2)
    with pytest.raises(InputError, match="no texts"):
        nn.trace([], template=0)
    with pytest.raises(BackendError, match="emb.trace"):
        nn.hooks(TEXTS)
    with pytest.raises(BackendError, match="stop the trace only after the exit layer"):
        with nn.trace(TEXTS, template=0) as run:
            run.stop()
        run.embeddings
    with nn.trace(TEXTS, template=0) as run:  # stopped after layer 0, before the recipe's TP at layer 1 (review:
        first = run.layers[0].output.save()  # nnsight's OutOfOrderError escaped the block)
        run.stop()
    assert first is not None
    with pytest.raises(BackendError, match="stop the trace only after the exit layer"):
        run.embeddings
    with pytest.raises(InputError, match="template=True"):
        nn.trace(TEXTS, template=True)
    mean = _apply(models, "llama", "prompt: '<PST> {text} means'\npooling: mean")
    with pytest.raises(InputError, match="input 1: mean pooling needs"):
        mean.trace(["a", ""])
    tl = _apply(models, "llama", "prompt: '<PST> {text}'\ntp: {start: 1, stop: 2}\nexit_layer: 2",
                backend="transformer_lens")
    with pytest.raises(BackendError, match="emb.hooks"):
        tl.trace(TEXTS)
    masked = _apply(models, "llama", "prompt: '<PST> {text}'\nplaceholder: {mask: first_layer}\nexit_layer: 2",
                    backend="transformer_lens")
    with pytest.raises(BackendError, match="recipe field `placeholder.mask`"):
        masked.hooks(TEXTS)
    with pytest.raises(InputError, match="hidden_state\\(9\\)"):
        with nn.trace(TEXTS, template=0) as run:
            run.hidden_state(9)
