"""Attention-mask edits (placeholder.mask: first_layer, attention.bidirectional) against a plain-PyTorch oracle.

The oracle builds every edited mask by explicit loops from the documented rule (docs/recipes.md), turns it into an
additive float mask, and swaps it into the decoder layer with a ``forward_pre_hook(with_kwargs=True)``; TP is done in
the same hook. No masking_utils, no nnsight.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tpsurgery
from tpsurgery.errors import ModelError
from tpsurgery.masks import allowed, layer_masks
from tpsurgery.batch import collate
from tpsurgery.plan import compile_plan
from tpsurgery.library import load_recipe
from tpsurgery.recipe import parse_recipe
from tpsurgery.testing import tiny_model

from recipe_oracle import additive, oracle_embed, rule, schedule
from tpsurgery.foreign import observer

N = 4
TEXTS = ["a b c.", "the cat sat on the mat.", "xy"]
COT = 'After thinking : <PST> "{text}" means:"'


@functools.lru_cache(maxsize=None)
def model(arch: str, n_layers: int = N):
    return tiny_model(arch, n_layers=n_layers, hidden=32, seed=1)


def oracle(hf, recipe, m, batch):
    """Last-token (or mean) read of hidden_states[M] with TP and mask swaps done by plain forward-pre-hooks."""
    layers = hf.model.layers if hasattr(hf, "model") else hf.transformer.h
    types = getattr(hf.config, "layer_types", None)
    dtype = next(hf.parameters()).dtype
    rows = torch.arange(batch.size).unsqueeze(1)
    handles = []
    sched = schedule(recipe, len(layers), m, hf.get_input_embeddings().weight.shape[1])  # from the recipe
    init_vector = sched["init_vector"]
    if init_vector is not None:
        embed = hf.get_input_embeddings()

        def init(mod, args, out):
            out = out.clone()
            out[rows, batch.placeholders] = init_vector.to(out.dtype)
            return out
        handles.append(embed.register_forward_hook(init))
    for i in range(min(m, len(layers))):
        hide, mode = sched["masks"].get(i, (False, "none"))
        edit_mask = i in sched["masks"]
        tp = i in sched["tp_layers"]
        if not (edit_mask or tp):
            continue
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        ok = rule(batch.attention_mask, batch.placeholders, batch.text_end, mask_placeholders=hide,
                  bidirectional=mode, window=window)
        float_mask = additive(ok, dtype)

        def hook(mod, args, kwargs, float_mask=float_mask, edit_mask=edit_mask, tp=tp):
            args = list(args)
            if edit_mask:
                if "attention_mask" in kwargs:
                    kwargs = {**kwargs, "attention_mask": float_mask}
                else:  # GPT-2 passes (hidden, cache, mask, ...) positionally
                    args[2] = float_mask
            if tp:
                h = args[0].clone()
                h[rows, batch.placeholders] = h[:, -1:].clone().expand(-1, batch.placeholders.shape[1], -1)
                args[0] = h
            return tuple(args), kwargs
        handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    return hs[m][:, -1].float()


VARIANTS = {
    "mask-first-layer": {"placeholder": {"mask": "first_layer", "init": "gaussian"}, "tp": {"start": 1, "stop": 3}},
    "last-token": {"attention": {"bidirectional": "last_token"}},
    "sentence": {"attention": {"bidirectional": "sentence", "layers": {"start": 1, "stop": 3}}},
    "sentence+tp+mask": {"attention": {"bidirectional": "sentence"}, "placeholder": {"mask": "first_layer"},
                         "tp": {"start": 1, "stop": 3}},
}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2", "gpt2"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_equals_mask_swapping_hook_oracle(arch, variant):
    hf, tok = model(arch)
    emb = tpsurgery.apply(hf, {"prompt": COT, "exit_layer": -1, **VARIANTS[variant]}, tokenizer=tok)
    got = emb.encode(TEXTS, convert_to_tensor=True)
    rows = emb.tokenize(TEXTS, COT)
    batch = collate(rows, emb.pad_id, emb.recipe.tp.source, hide_placeholders=emb.recipe.placeholder.mask == "all")
    want = oracle(hf, emb.recipe, emb.plan.exit_layer, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    # and the edit is not a no-op: the plain recipe differs
    plain = tpsurgery.apply(hf, {"prompt": COT, "exit_layer": -1, "tp": VARIANTS[variant].get("tp", [])},
                            tokenizer=tok).encode(TEXTS, convert_to_tensor=True)
    assert (got - plain).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2"])
def test_masks_follow_the_rule_in_each_layers_own_format(arch):
    hf, tok = model(arch, n_layers=6)
    emb = tpsurgery.apply(hf, {"prompt": COT, "attention": {"bidirectional": "sentence"},
                               "placeholder": {"mask": "first_layer"}}, tokenizer=tok)
    batch = collate(emb.tokenize(TEXTS, COT), emb.pad_id)
    masks = layer_masks(hf, emb.plan, batch)
    assert sorted(masks) == list(range(6))
    types = getattr(hf.config, "layer_types", None)
    real = batch.attention_mask.bool()
    for i, m in masks.items():
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        want = rule(batch.attention_mask, batch.placeholders, batch.text_end, mask_placeholders=i == 0,
                    bidirectional="sentence", window=window)
        if hf.config._attn_implementation == "eager":
            assert m.dtype.is_floating_point  # a bool mask would be silently added by eager attention
            got = m[:, 0] == 0
        else:
            assert m.dtype == torch.bool
            got = m[:, 0]
        assert torch.equal(got[real], want[real]), f"layer {i}"
        assert torch.equal(allowed(batch, mask_placeholders=i == 0, bidirectional="sentence",
                                   sliding_window=window)[real], want[real])
    if types:  # Gemma's sliding layers get a different mask from its full layers (texts are longer than the window)
        kinds = {types[i]: masks[i] for i in masks}
        assert not torch.equal(kinds["sliding_attention"], kinds["full_attention"])


def _layer0_states(hf, tok, recipe, texts):
    """Output of decoder layer 0 for each text (captured by a plain forward hook during encode), right-aligned:
    the prompt prefix may come from a cache, so index positions from the end."""
    calls, seen = [], []
    h = hf.model.layers[0].register_forward_hook(observer(lambda m, a, out: calls.append(out.detach().clone())))
    try:
        emb = tpsurgery.apply(hf, recipe, tokenizer=tok)
        for t in texts:
            calls.clear()
            emb.encode(t)
            seen.append(calls[-1])  # the call with the placeholder (a cached prompt prefix may run first)
    finally:
        h.remove()
    return emb, seen


def test_bidirectional_sentence_lets_earlier_tokens_see_the_last_sentence_token():
    hf, tok = model("llama")
    texts = ["one two threX", "one two threY"]  # same byte length; differ only in the last sentence token
    base = {"prompt": COT, "exit_layer": 2}
    for bidir, should_change in (("none", False), ("sentence", True)):
        emb, (a, b) = _layer0_states(hf, tok, {**base, "attention": {"bidirectional": bidir}}, texts)
        row = emb.tokenize(texts[:1], COT)[0]
        n = len(row.ids)
        first, last_text = row.placeholders[0] - n, row.text_span[1] - 1 - n  # from the end
        before = slice(first, last_text)  # the placeholder and the sentence up to its last token
        changed = (a[0, before] - b[0, before]).abs().amax(-1)
        assert bool((changed > 1e-6).all()) is should_change, (bidir, changed)
        assert not torch.equal(a[0, last_text], b[0, last_text])  # the texts do differ there


def test_bidirectional_last_token_lets_placeholder_onward_see_the_last_token():
    hf, tok = model("llama")
    text = ["a b c"]
    for bidir, should_change in (("none", False), ("last_token", True)):
        outs = []
        for end in ("X", "Y"):
            template = COT + end
            emb, (h,) = _layer0_states(hf, tok, {"prompt": template, "exit_layer": 2,
                                                 "attention": {"bidirectional": bidir}}, text)
            outs.append(h)
        row = emb.tokenize(text, COT + "X")[0]
        first = row.placeholders[0] - len(row.ids)  # from the end (the prompt prefix may come from a cache)
        diff = (outs[0] - outs[1])[0].abs().amax(-1)
        assert bool((diff[first:-1] > 1e-6).all()) is should_change
        earlier = diff[:first]
        assert earlier.numel() == 0 or float(earlier.max()) == 0.0


def test_masked_placeholder_makes_the_embedding_independent_of_its_initialisation():
    hf, tok = model("gemma3")
    inits = [{"init": "zeros"}, {"init": "ones"}, {"init": "gaussian", "std": 3.0}]
    for mask, same in (("first_layer", True), ("none", False)):
        embs = [tpsurgery.apply(hf, {"prompt": COT, "tp": {"start": 1, "stop": 3},
                                     "placeholder": {**init, "mask": mask}}, tokenizer=tok).encode(TEXTS)
                for init in inits]
        spread = max(abs(e - embs[0]).max() for e in embs)
        assert bool(spread < 1e-5) is same, (mask, spread)


def test_padding_stays_masked_under_edited_masks():
    hf, tok = model("gemma2")
    recipe = {"prompt": COT, "attention": {"bidirectional": "sentence"}, "placeholder": {"mask": "first_layer"},
              "tp": {"start": 1, "stop": 2}}
    emb = tpsurgery.apply(hf, recipe, tokenizer=tok)
    together = emb.encode(TEXTS, batch_size=3)
    alone = [emb.encode(t) for t in TEXTS]
    for a, b in zip(together, alone):
        assert abs(a - b).max() < 1e-5


def test_plain_plan_builds_no_masks_and_unsupported_attention_is_named():
    hf, tok = model("llama")
    emb = tpsurgery.apply(hf, {"prompt": COT, "tp": {"start": 1, "stop": 2}}, tokenizer=tok)
    assert layer_masks(hf, emb.plan, collate(emb.tokenize(TEXTS, COT), emb.pad_id)) == {}
    flash, ftok = tiny_model("llama", n_layers=2, attn="sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    emb = tpsurgery.apply(flash, {"prompt": COT, "attention": {"bidirectional": "last_token"}}, tokenizer=ftok)
    with pytest.raises(ModelError, match="sdpa or eager"):
        emb.encode("a")


@given(data=st.data())
def test_masks_equal_the_rule_for_any_batch_layout(data):
    """Random left-padded layouts: placeholders anywhere (several, adjacent, first column), sentence anywhere."""
    from tpsurgery.batch import Batch

    bsz = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(st.integers(3, 12), label="length")
    n_ph = data.draw(st.integers(1, 2), label="placeholders")
    rows = []
    for _ in range(bsz):
        n = data.draw(st.integers(n_ph + 1, length), label="row length")
        off = length - n
        ph = sorted(data.draw(st.lists(st.integers(off, length - 2), min_size=n_ph, max_size=n_ph, unique=True)))
        end = data.draw(st.integers(ph[0], length), label="text end")
        rows.append((off, ph, end))
    mask = torch.zeros((bsz, length), dtype=torch.long)
    for b, (off, _, _) in enumerate(rows):
        mask[b, off:] = 1
    batch = Batch(input_ids=torch.zeros((bsz, length), dtype=torch.long), attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0), placeholders=torch.tensor([r[1] for r in rows]),
                  source=torch.full((bsz,), length - 1), text_mask=torch.zeros((bsz, length)),
                  text_end=torch.tensor([r[2] for r in rows]))
    bidir = data.draw(st.sampled_from(["last_token", "sentence"]), label="bidirectional")
    arch = data.draw(st.sampled_from(["llama", "gemma2"]), label="arch")
    hf, _ = model(arch)
    plan = compile_plan(parse_recipe({"prompt": "<PST>{text}", "attention": {"bidirectional": bidir},
                                      "placeholder": {"mask": "first_layer"}}), N, 32)
    real = mask.bool()
    types = getattr(hf.config, "layer_types", None)
    for i, m in layer_masks(hf, plan, batch).items():
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        want = rule(mask, batch.placeholders, batch.text_end, mask_placeholders=i == 0, bidirectional=bidir,
                    window=window)
        got = m[:, 0] if m.dtype == torch.bool else m[:, 0] == 0
        assert torch.equal(got[real], want[real]), i


def test_mask_recipe_equals_the_oracle_on_smollm2(smollm2):
    """A real model (sdpa): bidirectional sentence + masked placeholder in layer 0 + TP, engine == hook oracle."""
    hf, tok = smollm2
    recipe = load_recipe("cot-bidir-sentence").replace(placeholder={"mask": "first_layer"}, tp={"start": 1, "stop": 8})
    emb = tpsurgery.apply(hf, recipe, tokenizer=tok)
    texts = ["A man is playing a guitar.", "Two dogs run on the beach"]
    got = emb.encode(texts, convert_to_tensor=True)
    want = oracle_embed(emb, texts)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


# --- each layer's mask is made of that layer's own edits (issue 21: mixed modes) -------------------------------------
MIXED = {"prompt": COT, "exit_layer": -1, "edits": [
    {"site": "attn_mask", "layers": 0, "op": "bidirectional", "mode": "last_token"},
    {"site": "attn_mask", "layers": [1, 2], "op": "bidirectional", "mode": "sentence"},
    {"site": "attn_mask", "layers": 2, "op": "hide"}]}


def _recipe_masks(recipe: dict) -> dict[int, tuple[bool, tuple[str, ...]]]:
    """``{layer: (hide placeholders, bidirectional modes)}`` read from the recipe's ``edits`` list."""
    out: dict[int, tuple[bool, tuple[str, ...]]] = {}
    for e in recipe["edits"]:
        for i in e["layers"] if isinstance(e["layers"], list) else [e["layers"]]:
            hide, modes = out.get(i, (False, ()))
            out[i] = (hide or e["op"] == "hide", modes + ((e["mode"],) if e["op"] == "bidirectional" else ()))
    return out


def _rule_of(batch, hide, modes, window):
    ok = rule(batch.attention_mask, batch.placeholders, batch.text_end, mask_placeholders=hide,
              bidirectional=modes[0] if modes else "none", window=window)
    for mode in modes[1:]:
        ok |= rule(batch.attention_mask, batch.placeholders, batch.text_end, mask_placeholders=hide,
                   bidirectional=mode, window=window)
    return ok


def _mask_swap_oracle(hf, recipe: dict, batch) -> torch.Tensor:
    """Last-token read of the final-norm output with each layer's mask swapped in by a plain forward-pre-hook."""
    layers = hf.model.layers if hasattr(hf, "model") else hf.transformer.h
    types = getattr(hf.config, "layer_types", None)
    dtype = next(hf.parameters()).dtype
    handles = []
    for i, (hide, modes) in _recipe_masks(recipe).items():
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        float_mask = additive(_rule_of(batch, hide, modes, window), dtype)

        def hook(mod, args, kwargs, float_mask=float_mask):
            if "attention_mask" in kwargs:
                return args, {**kwargs, "attention_mask": float_mask}
            return (*args[:2], float_mask, *args[3:]), kwargs  # GPT-2 passes it positionally
        handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    return hs[-1][:, -1].float()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("engine", ["hooks", "trace", "transformer_lens"])
def test_each_layer_gets_the_mask_of_its_own_edits(arch, engine):
    """last_token at layer 0, sentence at layers 1-2 (and hidden placeholders at 2): before issue 21 every layer got
    the first edit's mode."""
    hf, tok = model(arch)
    kw = {"backend": "transformer_lens"} if engine == "transformer_lens" else {}
    emb = tpsurgery.apply(hf, MIXED, tokenizer=tok, **kw)
    if engine == "trace":
        emb.backend.fast_path = False
    got = emb.encode(TEXTS, convert_to_tensor=True, batch_size=8)
    batch = collate(emb.tokenize(TEXTS, COT), emb.pad_id)
    want = _mask_swap_oracle(hf, MIXED, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    emb.close()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_masks_follow_each_layers_own_edits(arch):
    hf, tok = model(arch)
    emb = tpsurgery.apply(hf, MIXED, tokenizer=tok)
    batch = collate(emb.tokenize(TEXTS, COT), emb.pad_id)
    masks = layer_masks(hf, emb.plan, batch)
    types = getattr(hf.config, "layer_types", None)
    real = batch.attention_mask.bool()
    assert sorted(masks) == sorted(_recipe_masks(MIXED))
    for i, (hide, modes) in _recipe_masks(MIXED).items():
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        m = masks[i]
        got = m[:, 0] == 0 if m.dtype.is_floating_point else m[:, 0]
        assert torch.equal(got[real], _rule_of(batch, hide, modes, window)[real]), f"layer {i}"
