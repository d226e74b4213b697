"""Property 6 of issue 5: shapes and dtypes of ``encode`` for any recipe, any sentences, any model dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tpsurgery
from prop_support import model_for
from strategies import scaled, archs, batch_sizes, engine_recipes, sentence_lists, sentences
from test_prop_engine import expected_rows, plain_embedder, rel_err, resolve_exit, valid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
D = 32


@given(data=st.data())
def test_shapes_and_dtypes(data):
    """(n, d) float32 numpy or tensor; 1-D for a str; (n, M+1, d) for all_layers, whose slices are the exit reads."""
    arch = data.draw(archs(), label="arch")
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(surgery=True), label="recipe"))
    model, tok = model_for(arch)
    texts = data.draw(sentence_lists(min_size=0, max_size=5, long=False), label="texts")
    per_t = [expected_rows(recipe, t, texts, model, False) for t in recipe.templates]
    assume(all(valid(recipe, rows) for rows in per_t))
    emb = plain_embedder(model, recipe, tok)
    m = resolve_exit(recipe.exit_layer, 4)
    bs = data.draw(batch_sizes(), label="bs")
    out = emb.encode(texts, batch_size=bs)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (len(texts), D)
    assert np.isfinite(out).all()
    t = emb.encode(texts, batch_size=bs, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (len(texts), D)
    np.testing.assert_array_equal(t.numpy(), out)
    normed = emb.encode(texts, batch_size=bs, normalize_embeddings=True)
    assert normed.shape == (len(texts), D)
    nonzero = np.linalg.norm(out, axis=-1) > 0  # e.g. exit 0 on a pad-id placeholder (zero embedding row)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=-1)[nonzero], 1.0, rtol=1e-5)
    assert (normed[~nonzero] == 0).all()
    layers = emb.encode(texts, batch_size=bs, all_layers=True)
    assert layers.shape == (len(texts), m + 1, D) and layers.dtype == np.float32
    if texts:
        one = emb.encode(texts[0])
        assert one.shape == (D,) and one.dtype == np.float32
        assert emb.encode(texts[0], all_layers=True).shape == (m + 1, D)
        # the last slice is the exit read; slice j is what exit_layer j alone reads (TP before j included)
        assert rel_err(layers[:, m], out) <= 1e-6
        j = data.draw(st.integers(0, m), label="j")
        at_j = plain_embedder(model, recipe.replace(exit_layer=j), tok).encode(texts, batch_size=bs)
        assert rel_err(layers[:, j], at_j) <= 1e-6, f"all_layers[:, {j}] != exit_layer {j}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@scaled(0.4)
@given(arch=archs(), texts=sentence_lists(min_size=1, max_size=3, long=False), data=st.data())
def test_half_precision_models_return_float32(dtype, arch, texts, data):
    model, tok = model_for(arch, dtype=dtype)
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(masks=False), label="recipe"))
    per_t = [expected_rows(recipe, t, texts, model, False) for t in recipe.templates]
    assume(all(valid(recipe, rows) for rows in per_t))
    emb = tpsurgery.apply(model, recipe, tokenizer=tok)
    out = emb.encode(texts)
    assert out.dtype == np.float32 and out.shape == (len(texts), D) and np.isfinite(out).all()
    single = emb.encode(texts[0], convert_to_tensor=True)
    assert single.dtype == torch.float32 and single.shape == (D,)
    # the model's own dtype is kept
    assert next(model.parameters()).dtype == dtype


@given(text=sentences(long=False))
@scaled(0.33)
def test_single_string_is_the_first_row_of_its_list(text):
    model, tok = model_for("llama", bos=True)
    emb = tpsurgery.apply(model, {"prompt": 'This : <PST> "{text}" means', "tp": {"start": 1, "stop": 3},
                                  "exit_layer": 3}, tokenizer=tok)
    np.testing.assert_array_equal(emb.encode(text), emb.encode([text])[0])
