"""Self-tests of the Contrastive Prompting oracle (tests/cp_oracle.py), so the reference itself is checked.

* its o_proj-like table names, for every tiny family, a module whose input is the concatenated per-head attention
  outputs in head-major order (checked by perturbing one query head / zeroing one value group);
* an auxiliary prompt equal to the normal prompt gives a zero row at the site (scaled C = 1 and norm);
* CP changes only the last token, and only from hidden_states[l + 1] on; the edited row is the official formula;
* the auxiliary run stops at layer l and its B equals the row of a complete run;
* the TransformerLens route (``o.hook_in``, flattened) gives the same CP embedding as the HF pre-hook route.
"""

from __future__ import annotations

import functools

import pytest
import torch

from cp_oracle import CP, O_PROJ, aux_row, cp_edit, cp_hidden, edited_row, o_proj_module, tl_cp_embed
from prop_support import decoder_parts, model_for
from tpsurgery.prompts import encode_prompts
from tpsurgery.testing import ARCHS, tiny_model
from tpsurgery.foreign import observer

PROMPT = 'This sentence : "{text}" means in one word:"'
AUX = 'The irrelevant information of this sentence : "{text}" means in one word:"'
TP_PROMPT = 'This sentence : <PST> "{text}" means in one word:"'
TEXT = "A man is playing a guitar"
LAYER = 1


def rows(tok, template, text=TEXT, ph=0):
    return encode_prompts(tok, template, [text], ph, preprocess=True)[0]


def _slices(model, h, hd, nh, group):
    """(parameter, dim, index) of query head ``h`` or, with ``group``, of value group ``h``, per family layout."""
    t = model.config.model_type
    if t in ("gpt2",):
        return [("attn.c_attn.weight", 1, slice((2 * nh + h) * hd if group else h * hd,
                                                 (2 * nh + h + 1) * hd if group else (h + 1) * hd))]
    if t == "gpt_neox":  # per-head interleaved [q, k, v]
        lo = 3 * h * hd + (2 * hd if group else 0)
        return [("attention.query_key_value.weight", 0, slice(lo, lo + hd)),
                ("attention.query_key_value.bias", 0, slice(lo, lo + hd))]
    if t == "falcon":  # multi-query: [q heads; k; v]
        lo = (nh + 1) * hd if group else h * hd
        return [("self_attention.query_key_value.weight", 0, slice(lo, lo + hd))]
    if t == "phi3":  # [q; k; v]
        nkv = model.config.num_key_value_heads
        lo = (nh + nkv + h) * hd if group else h * hd
        return [("self_attn.qkv_proj.weight", 0, slice(lo, lo + hd))]
    prefix = "self_attn." + ("v_proj" if group else "q_proj")
    out = [(prefix + ".weight", 0, slice(h * hd, (h + 1) * hd))]
    if t == "opt":
        out.append((prefix + ".bias", 0, slice(h * hd, (h + 1) * hd)))
    return out


def _site_input(model, ids):
    got = []
    handle = o_proj_module(model, LAYER).register_forward_pre_hook(observer(lambda m, a: got.append(a[0][0].clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    (x,) = got
    return x


def test_formulas_by_hand():
    a, b = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert edited_row(a, b, CP(0, "scaled", 3.0)).tolist() == [3.0, 0.0]  # C * (A - B), not C * A - B
    assert edited_row(a, b, CP(0, "norm")).tolist() == [2.0 / (1.0 + 1e-7), 0.0]  # ||A|| / (||A - B|| + eps)
    assert edited_row(a, a, CP(0, "norm")).tolist() == [0.0, 0.0]  # no 0/0
    a2 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(edited_row(a2, torch.zeros(2, dtype=torch.float64), CP(0, "norm", eps=0.0)), a2)


@pytest.mark.parametrize("arch", ARCHS)
def test_o_proj_table_names_the_concatenated_heads_input(arch):
    model, tok = tiny_model(arch, n_layers=2)  # a private copy: its weights are edited below
    cfg = model.config
    nh = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    nkv = 1 if arch == "falcon" else (getattr(cfg, "num_key_value_heads", None) or nh)
    layer = decoder_parts(model)[0][LAYER]
    ids = torch.tensor([tok("The cat sat on the mat.")["input_ids"]])
    base = _site_input(model, ids)
    assert base.shape[-1] == nh * hd

    def with_edit(items, fn):
        saved = []
        for path, dim, sl in items:
            p = functools.reduce(getattr, path.split("."), layer)
            saved.append((p, p.data.clone()))
            idx = [slice(None)] * p.dim()
            idx[dim] = sl
            fn(p.data, tuple(idx))
        try:
            return _site_input(model, ids)
        finally:
            for p, d in saved:
                p.data.copy_(d)

    cols = [slice(j * hd, (j + 1) * hd) for j in range(nh)]
    # a query head's change moves exactly its own columns (position 0 attends only itself); OLMo-2 RMS-normalizes the
    # whole query projection (q_norm over all heads), which couples the heads' queries, so only its values are checked
    for h in range(nh) if arch != "olmo2" else ():
        new = with_edit(_slices(model, h, hd, nh, False), lambda t, i: t.__setitem__(i, t[i] * 3 + 0.5))
        assert [not torch.allclose(new[1:, c], base[1:, c]) for c in cols] == [j == h for j in range(nh)]
        torch.testing.assert_close(new[0], base[0])
    for g in range(nkv):  # zeroing a value group zeroes exactly the columns of its query heads
        new = with_edit(_slices(model, g, hd, nh, True), lambda t, i: t.__setitem__(i, 0.0))
        assert [bool((new[:, c] == 0).all()) for c in cols] == [j // (nh // nkv) == g for j in range(nh)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cp", [CP(LAYER, "scaled", 1.0), CP(LAYER, "norm")], ids=["scaled", "norm"])
def test_aux_prompt_equal_to_the_prompt_zeroes_the_row(arch, cp):
    model, tok = model_for(arch)
    row = rows(tok, PROMPT)
    b = aux_row(model, row, cp.layer)
    seen = []
    with cp_edit(model, cp, b, seen), torch.no_grad():
        model(input_ids=torch.tensor([row.ids]))
    ((a, new),) = seen
    torch.testing.assert_close(a[0], b, rtol=0, atol=0)
    assert new.abs().max() == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["scaled", "norm"])
def test_cp_edits_the_last_token_from_layer_l_on(arch, mode):
    model, tok = model_for(arch)
    # tiny Gemma3's layers 0-1 slide over 6 tokens: up to layer 1 the last token sees only the prompts' common
    # suffix, so A == B up to rounding there (norm would blow rounding noise up to ||A||); layer 2 attends fully
    cp = CP(2 if arch == "gemma3" else LAYER, mode, 2.0)
    row, aux = rows(tok, PROMPT), rows(tok, AUX)
    plain = cp_hidden(model, row, aux, None)
    b = aux_row(model, aux, cp.layer)
    seen = []
    with cp_edit(model, cp, b, seen):
        edited = cp_hidden(model, row, aux, None)  # cp_edit is active: a CP run by hand
    again = cp_hidden(model, row, aux, cp)
    for x, y in zip(edited, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    ((a, new),) = seen
    torch.testing.assert_close(new, edited_row(a, b, cp))
    if cp.mode == "norm":
        torch.testing.assert_close(new.norm(), a.norm())
    assert not torch.allclose(new, a)
    for k, (p, e) in enumerate(zip(plain, edited)):
        torch.testing.assert_close(e[0, :-1], p[0, :-1], rtol=0, atol=0)  # causal: earlier tokens never change
        if k <= cp.layer:  # hidden_states[k] is the input of layer k: untouched up to layer l's input
            torch.testing.assert_close(e, p, rtol=0, atol=0)
        else:
            assert (e[0, -1] - p[0, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_aux_run_stops_at_layer_l_and_keeps_the_complete_runs_row(arch):
    model, tok = model_for(arch)
    aux = rows(tok, AUX)
    layers = decoder_parts(model)[0]
    entered = [0] * len(layers)
    handles = [m.register_forward_pre_hook(observer(lambda mod, a, i=i: entered.__setitem__(i, entered[i] + 1)))
               for i, m in enumerate(layers)]
    try:
        b = aux_row(model, aux, 2)
    finally:
        for h in handles:
            h.remove()
    assert entered == [1, 1, 1, 0]
    full = []
    handle = o_proj_module(model, 2).register_forward_pre_hook(observer(lambda m, a: full.append(a[0][0, -1].clone())))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([aux.ids]))
    finally:
        handle.remove()
    torch.testing.assert_close(b, full[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tp_and_cp_compose(arch):
    model, tok = model_for(arch)
    row, aux = rows(tok, TP_PROMPT, ph=tok.unk_token_id), rows(tok, AUX)
    tp = {"source": -1, "tp_layers": (1, 2)}
    only_tp = cp_hidden(model, row, aux, None, tp)
    seen = []
    cp_hidden(model, row, row, CP(2, "scaled", 1.0), tp, aux_tp=True, seen=seen)
    assert seen[0][1].abs().max() == 0  # TP on both runs + identical prompts: the row is zero
    seen = []
    cp_hidden(model, row, row, CP(2, "scaled", 1.0), tp, seen=seen)
    assert seen[0][1].abs().max() > 1e-4  # TP on the normal run only: A != B
    both = cp_hidden(model, row, aux, CP(2, "scaled", 2.0), tp)
    no_tp = cp_hidden(model, row, aux, CP(2, "scaled", 2.0))
    assert (both[-1][0, -1] - only_tp[-1][0, -1]).abs().max() > 1e-4
    assert (both[-1][0, -1] - no_tp[-1][0, -1]).abs().max() > 1e-4


def test_every_tiny_family_is_in_the_table():
    assert {model_for(a)[0].config.model_type for a in ARCHS} <= set(O_PROJ)


@pytest.mark.slow
def test_oracle_on_smollm2(smollm2):
    model, tok = smollm2
    row, aux = rows(tok, PROMPT), rows(tok, AUX)
    cp = CP(5, "scaled", 1.0)
    seen = []
    with cp_edit(model, cp, aux_row(model, row, cp.layer), seen), torch.no_grad():
        model(input_ids=torch.tensor([row.ids]))
    assert seen[0][1].abs().max() == 0
    plain = cp_hidden(model, row, aux, None)
    edited = cp_hidden(model, row, aux, CP(5, "scaled", 2.0))
    torch.testing.assert_close(edited[5], plain[5], rtol=0, atol=0)
    assert (edited[6][0, -1] - plain[6][0, -1]).abs().max() > 1e-3
    assert o_proj_module(model, 5).in_features == model.config.num_attention_heads * model.config.head_dim


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon", "gemma3"])
@pytest.mark.parametrize("mode", ["scaled", "norm"])
def test_transformer_lens_site_gives_the_same_cp_embedding(arch, mode):
    from tpsurgery.backends.tl_backend import boot_bridge

    model, tok = model_for(arch)
    bridge = boot_bridge(model, tok)
    row, aux = rows(tok, PROMPT), rows(tok, AUX)
    cp = CP(2, mode, 2.0)
    want = cp_hidden(model, row, aux, cp)[3][0, -1].float()
    got = tl_cp_embed(bridge, row.ids, aux.ids, cp, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cp_hidden(model, row, aux, None)[3][0, -1].float(), want)
