"""Property 7 of issue 5: attention masks, checked on the attention probabilities of eager tiny models.

Causal recipes: no weight reaches a future column or a pad. ``placeholder.mask: first_layer``: in layer 0 no other
token attends to a placeholder. ``attention.bidirectional``: ``sentence`` lets the span [first placeholder, end of
sentence) see itself and nothing else sees the future; ``last_token`` lets every query from the first placeholder on
also see the last column. Outside ``attention.layers`` (and the layers the recipe does not edit) masks stay causal.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tpsurgery
from prop_support import AttentionProbe, Probe, match_rows, model_for
from strategies import scaled, MASKS_LANDED, archs, batch_sizes, engine_recipes, sentence_lists
from test_prop_engine import expected_rows, plain_embedder, resolve_exit, valid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def edited_layers(recipe, m: int) -> set[int]:
    if recipe.attention.bidirectional == "none":
        return set()
    span = recipe.attention.layers
    return {i for i in (range(span.start, span.stop) if span else range(4)) if i < m}


def check_layer(recipe, i, w, rows, offs, mask, L, bidir_here):
    """w: [B, H, L, L] probabilities of layer i."""
    hide = recipe.placeholder.mask == "all"
    mask_ph = recipe.placeholder.mask == "first_layer" and i == 0
    for b, (r, off) in enumerate(zip(rows, offs)):
        phs = [off + p for p in r.placeholders]
        first = min(phs) if phs else L
        end = off + r.text_span[1]
        live = [q for q in range(off, L) if mask[b, q]]  # queries: visible columns (hidden placeholders are like pads)
        for q in live:
            for k in range(L):
                p = w[b, :, q, k]
                visible = bool(mask[b, k]) and not ((mask_ph or hide) and k in phs and k != q)
                extra = False
                if bidir_here and recipe.attention.bidirectional == "sentence":
                    extra = first <= q < end and first <= k < end
                elif bidir_here and recipe.attention.bidirectional == "last_token":
                    extra = q >= first and k == L - 1
                if not visible or (k > q and not extra):
                    assert torch.all(p == 0), f"layer {i} row {b}: query {q} attends to key {k} (w={p.max():.3g})"
                elif k > q and extra:
                    assert torch.all(p > 0), f"layer {i} row {b}: bidirectional query {q} does not see key {k}"
        if mask_ph or hide:
            for k in phs:
                others = [q for q in live if q != k]
                assert torch.all(w[b, :, others, k] == 0), f"layer {i}: a token attends to the placeholder {k}"


@given(data=st.data())
@scaled(1)
def test_attention_probabilities_follow_the_recipe(data):
    arch = data.draw(archs(), label="arch")
    edits = MASKS_LANDED and data.draw(st.integers(0, 2), label="edits") > 0  # 2/3 of the cases edit masks
    recipe = tpsurgery.parse_recipe(data.draw(engine_recipes(edits=edits), label="recipe"))
    model, tok = model_for(arch, attn="eager")
    texts = data.draw(sentence_lists(max_size=3, long=False), label="texts")
    per_t = [expected_rows(recipe, t, texts, model, False) for t in recipe.templates]
    assume(all(valid(recipe, rows) for rows in per_t))
    m = resolve_exit(recipe.exit_layer, 4)
    assume(m >= 1)
    emb = plain_embedder(model, recipe, tok)
    with Probe(model) as probe, AttentionProbe(model) as att:
        emb.encode(texts, batch_size=data.draw(batch_sizes(), label="bs"))
    bidir = edited_layers(recipe, m)
    n_per_t = len(probe.calls) // len(per_t)
    for k, call in enumerate(probe.calls):
        rows_t = per_t[k // n_per_t]
        ids, mask = call["input_ids"], call["attention_mask"]
        hide = recipe.placeholder.mask == "all"
        rows = match_rows(ids, mask if not hide else _content_mask(ids, mask, rows_t), rows_t)
        L = ids.shape[1]
        offs = [L - len(r.ids) for r in rows]
        for i in range(min(m, 4)):
            assert len(att.weights[i]) == len(probe.calls), f"layer {i}: no attention probabilities captured"
            check_layer(recipe, i, att.weights[i][k], rows, offs, mask, L, i in bidir)


def _content_mask(ids, mask, rows):
    """With hidden placeholders the 2D mask has holes; the row layout is still left padding."""
    out = mask.clone()
    for b in range(ids.shape[0]):
        nz = mask[b].nonzero()
        if len(nz):
            out[b, int(nz[0]):] = 1
    return out


@pytest.mark.skipif(not MASKS_LANDED, reason="tpsurgery/masks.py (attention edits) not built yet")
def test_masks_module_present_and_bidirectional_drawn():
    """The strategies draw bidirectional recipes only once masks.py exists; make sure they do now."""
    from hypothesis import find

    r = find(engine_recipes(), lambda r: r.get("attention", {}).get("bidirectional") == "sentence")
    assert r["attention"]["bidirectional"] == "sentence"
