"""Property 8 of issue 5: the model is untouched by apply + encode, also when a batch fails half-way.

Parameters, buffers, config, training flags and every registered hook are compared before and after. transformers 5
installs output-capturing forward hooks of its own the first time a model runs with ``output_hidden_states=True``
(engine-notes section 6) and keeps them: those are told apart by the hook function's module, and may only ever be
transformers' own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tpsurgery
from prop_support import Snapshot, decoder_parts, is_transformers_hook, model_for, raising_on_call
from strategies import scaled, archs, batch_sizes, engine_recipes, sentence_lists
from test_prop_engine import expected_rows, resolve_exit, valid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def own_hooks(model) -> dict:
    """Every hook that is not transformers' output capturing."""
    out = {}
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            fns = [f for f in getattr(mod, attr).values() if not is_transformers_hook(f)]
            if fns:
                out[(name, attr)] = fns
    return out


def plain_logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def check_same(before: Snapshot, model, logits_before):
    after = Snapshot.of(model)
    problems = [p for p in before.diff(after) if not p.startswith("hooks changed")]
    assert not problems, problems
    hooks_before = {k: v for k, v in before.hooks.items()}
    added = set(after.hooks.items()) - set(hooks_before.items())
    for (name, attr), _ in added:  # only transformers' own capturing hooks may appear
        mod = dict(model.named_modules())[name]
        assert all(is_transformers_hook(f) for f in getattr(mod, attr).values()
                   if id(f) not in {i for _, i in dict(hooks_before).get((name, attr), ())}), (name, attr)
    assert not set(hooks_before.items()) - set(after.hooks.items()), "a hook that was there is gone"
    assert not own_hooks(model), f"hooks left behind: {own_hooks(model)}"
    assert torch.equal(plain_logits(model), logits_before), "a plain forward changed"


@given(data=st.data())
@scaled(0.67)
def test_model_untouched_after_apply_and_encode(data):
    arch = data.draw(archs(), label="arch")
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(surgery=True), label="recipe"))
    model, tok = model_for(arch)
    texts = data.draw(sentence_lists(max_size=4, long=False), label="texts")
    assume(all(valid(recipe, expected_rows(recipe, t, texts, model, False)) for t in recipe.templates))
    logits = plain_logits(model)
    training = data.draw(st.booleans(), label="training mode")  # the flags must come back as they were
    model.train(training)
    try:
        before = Snapshot.of(model)
        emb = tpsurgery.apply(model, recipe, tokenizer=tok)
        emb.encode(texts, batch_size=data.draw(batch_sizes(), label="bs"),
                   all_layers=data.draw(st.booleans(), label="all_layers"))
        assert {n: m.training for n, m in model.named_modules()} == before.training, "training flags changed"
    finally:
        model.eval()
    before.training = {n: False for n in before.training}
    check_same(before, model, logits)


@given(data=st.data())
@scaled(0.67)
def test_model_untouched_after_a_failure_mid_batch(data):
    """A layer that raises on its 2nd call (2nd batch): the error surfaces, nothing is left on the model, and the
    same embedder gives the same embeddings afterwards."""
    arch = data.draw(archs(), label="arch")
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(surgery=True), label="recipe"))
    model, tok = model_for(arch)
    m = resolve_exit(recipe.exit_layer, 4)
    assume(m >= 1)
    texts = data.draw(sentence_lists(min_size=2, max_size=4, long=False).filter(lambda t: len(set(t)) >= 2),
                      label="texts")
    assume(all(valid(recipe, expected_rows(recipe, t, texts, model, False)) for t in recipe.templates))
    layer = decoder_parts(model)[0][data.draw(st.integers(0, m - 1), label="failing layer")]
    emb = tpsurgery.apply(model, recipe, tokenizer=tok)
    good = emb.encode(texts, batch_size=1)
    logits = plain_logits(model)
    before = Snapshot.of(model)
    with raising_on_call(layer, 2):
        with pytest.raises(Exception, match="injected failure"):
            emb.encode(texts, batch_size=1)
    check_same(before, model, logits)
    np.testing.assert_array_equal(emb.encode(texts, batch_size=1), good)
    fresh = tpsurgery.apply(model, recipe, tokenizer=tok).encode(texts, batch_size=1)
    np.testing.assert_array_equal(fresh, good)
