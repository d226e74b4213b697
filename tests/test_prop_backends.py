"""Property 9 of issue 5: the TransformerLens backend agrees with the nnsight backend on random recipes/sentences.

Skipped until ``backend="transformer_lens"`` exists. TransformerLens runs an eager-attention copy of the model, so the
two agree to float32 rounding, not bit for bit (relative tolerance below).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tpsurgery
from prop_support import model_for
from strategies import scaled, batch_sizes, engine_recipes, sentence_lists
from test_prop_engine import expected_rows, rel_err, valid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
HAS_TL = "transformer_lens" in getattr(__import__("tpsurgery.api").api, "BACKENDS", ())
TL_ARCHS = ("llama", "mistral", "qwen2", "gemma3")  # the families the TransformerLens backend documents as tested
RTOL = 1e-4


@functools.lru_cache(maxsize=None)
def tl_bridge(arch):
    model, tok = model_for(arch)
    return tpsurgery.apply(model, {}, tokenizer=tok, backend="transformer_lens").backend.bridge


@pytest.mark.skipif(not HAS_TL, reason="tpsurgery/backends/tl_backend.py (backend='transformer_lens') not built yet")
@scaled(0.67)
@given(data=st.data())
def test_backends_agree(data):
    arch = data.draw(st.sampled_from(TL_ARCHS), label="arch")
    model, tok = model_for(arch)
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(), label="recipe"))
    texts = data.draw(sentence_lists(max_size=4), label="texts")
    assume(all(valid(recipe, expected_rows(recipe, t, texts, model, False)) for t in recipe.templates))
    nn = tpsurgery.apply(model, recipe, tokenizer=tok)
    tl = tpsurgery.apply(tl_bridge(arch), recipe, tokenizer=tok)
    assert tl.backend.name == "transformer_lens" and nn.backend.name == "nnsight"
    bs = data.draw(batch_sizes(), label="bs")
    all_layers = data.draw(st.booleans(), label="all_layers")
    want = nn.encode(texts, batch_size=bs, all_layers=all_layers, convert_to_tensor=True)
    got = tl.encode(texts, batch_size=bs, all_layers=all_layers, convert_to_tensor=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= RTOL, f"backends differ: relative error {rel_err(got, want):.2e}"
