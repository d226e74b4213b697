"""Edits that cannot act (tpsurgery.effects): decided from the model's structure, checked against the numbers.

Oracle: with every norm's epsilon set to ~0 (tiny random models have activations so small that the epsilon hides the
cancellation), a flagged scale must give the same embedding for two different factors, and an unflagged one must not.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.effects import InertEditWarning, attn_output_norm, describe_inert, inert_edits
from tpsurgery.testing import ARCHS, tiny_model

TEXTS = ["a man plays a guitar", "two dogs run in the snow"]
SUB = {"site": "attn_out_in", "layers": 1, "rows": "last", "op": "subtract", "run": "aux"}


def recipe(*edits, exit_layer=3):
    return {"prompt": "This : {text} means", "exit_layer": exit_layer, "runs": {"aux": "Nothing : {text} is"},
            "edits": list(edits)}


def scale(factor, site="attn_out_in", layers=1, heads=None, rows="last"):
    return {"site": site, "layers": layers, "rows": rows, "op": "scale", "factor": factor,
            **({"heads": heads} if heads is not None else {})}


def quiet_apply(model, tok, r):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tpsurgery.apply(model, r, tokenizer=tok)


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in ("gemma2", "gemma3", "llama"):
        m, tok = tiny_model(arch, n_layers=4)
        for mod in m.modules():  # make the norms exactly scale-invariant, so the oracle can see the cancellation
            for attr in ("eps", "variance_epsilon"):
                if isinstance(getattr(mod, attr, None), float):
                    setattr(mod, attr, 1e-30)
        out[arch] = (m, tok)
    return out


def flagged(model, tok, r):
    return [i for i in inert_edits(quiet_apply(model, tok, r)) if i.what.startswith(r["edits"][-1]["site"])
            and "scale" in i.what]


def embed(model, tok, r):
    return torch.as_tensor(quiet_apply(model, tok, r).encode(TEXTS))


@pytest.mark.parametrize("arch", ARCHS)
def test_cp_scale_is_flagged_exactly_on_models_that_normalise_the_attention_output(arch):
    model, tok = tiny_model(arch, n_layers=4)
    found = inert_edits(quiet_apply(model, tok, recipe(SUB, scale(2.0))))
    if arch in ("gemma2", "gemma3", "olmo2"):  # post-norm on the attention output before the residual add
        assert [(i.field, i.layer) for i in found] == [("edits.1", 1)]
        assert found[0].by == "model.layers.1.post_attention_layernorm"
    else:  # Llama & co. add the attention output unnormalised (gpt2/opt/falcon... too): a real effect
        assert found == [], found


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(["gemma2", "gemma3", "llama"]), factor=st.sampled_from([0.5, 3.0, -2.0, 0.0]),
       heads=st.sampled_from([None, [0], [0, 1, 2, 3], [1, 3]]), after=st.sampled_from([None, "scale", "subtract"]),
       rows=st.sampled_from(["last", -2]))
def test_flagged_iff_the_factor_cannot_change_the_embedding(models, arch, factor, heads, after, rows):
    model, tok = models[arch]
    tail = {"scale": [scale(1.5, rows=rows)], "subtract": [{**SUB, "rows": rows}], None: []}[after]

    def r(f):
        return recipe(SUB, scale(f, heads=heads, rows=rows), *tail)

    found = [i for i in inert_edits(quiet_apply(model, tok, r(factor))) if i.field == "edits.1"]
    other = factor * 3 if factor else 0.7  # same sign: only the factor's size differs
    moved = float((embed(model, tok, r(factor)) - embed(model, tok, r(other))).abs().max())
    if found:
        assert moved < 2e-5, (found, moved)
    else:
        assert moved > 1e-4, moved  # (a row other than the read one moves it less)
    want = arch != "llama" and factor != 0 and heads in (None, [0, 1, 2, 3]) and after != "subtract"
    assert bool(found) == want


def test_noops_and_a_scale_undone_by_recover_norm_are_flagged_on_every_model(models):
    model, tok = models["llama"]
    found = inert_edits(quiet_apply(model, tok, recipe(
        scale(1.0, site="layer_in"), {"site": "layer_out", "layers": 0, "rows": "last", "op": "copy", "alpha": 0.0},
        SUB, scale(3.0), {"site": "attn_out_in", "layers": 1, "rows": "last", "op": "recover_norm"},
        {"site": "attn_out_in", "layers": 2, "rows": "last", "op": "recover_norm"})))
    assert sorted((i.field, i.by) for i in found) == [
        ("edits.0", "its own parameter"), ("edits.1", "its own parameter"),
        ("edits.3", "the recover_norm after it at the same site"), ("edits.5", "itself")]
    r = recipe(SUB, scale(3.0), {"site": "attn_out_in", "layers": 1, "rows": "last", "op": "recover_norm"})
    assert float((embed(model, tok, r) - embed(model, tok, {**r, "edits": [SUB, scale(7.0), r["edits"][2]]})
                  ).abs().max()) < 1e-4


def test_a_whole_row_scale_before_the_final_norm_is_flagged_and_cancelled(models):
    model, tok = models["llama"]
    r = recipe(scale(3.0, site="layer_out", layers=3), exit_layer=4)
    assert [i.by for i in inert_edits(quiet_apply(model, tok, r))] == ["model.norm"]
    assert float((embed(model, tok, r) - embed(model, tok, recipe(scale(5.0, site="layer_out", layers=3),
                                                                  exit_layer=4))).abs().max()) < 1e-4
    assert inert_edits(quiet_apply(model, tok, recipe(scale(3.0, site="layer_out", layers=2), exit_layer=4))) == []


def test_edits_at_or_after_the_exit_are_listed_and_still_warned_by_the_plan(models):
    model, tok = models["llama"]
    with pytest.warns(UserWarning, match=r"edits.1 \(layers 3\): dropped"):
        emb = tpsurgery.apply(model, recipe(SUB, scale(2.0, layers=3)), tokenizer=tok)
    assert [(i.field, i.layer) for i in inert_edits(emb) if i.by.startswith("the exit")] == [("edits.1", 3)]


def test_apply_warns_once_naming_the_cancelling_module(models):
    model, tok = models["gemma2"]
    with pytest.warns(InertEditWarning, match=r"edits.1 \(layer 1\): attn_out_in scale by 2.0 is cancelled by "
                                              r"model.layers.1.post_attention_layernorm"):
        tpsurgery.apply(model, recipe(SUB, scale(2.0)), tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InertEditWarning)
        tpsurgery.apply(models["llama"][0], recipe(SUB, scale(2.0)), tokenizer=models["llama"][1])  # Llama's factor acts: no warning


def test_attention_output_norm_from_structure():
    assert attn_output_norm(tiny_model("gemma2")[0]) == "post_attention_layernorm"
    assert attn_output_norm(tiny_model("gemma")[0]) is None  # Gemma 1: post_attention_layernorm is the pre-MLP norm
    assert attn_output_norm(tiny_model("llama")[0]) is None


def test_explain_shows_the_inert_edits(tmp_path, models):
    model, tok = tiny_model("gemma2", n_layers=4)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(
        "prompt: 'This : {text} means'\nexit_layer: 3\nruns: {aux: 'Nothing : {text} means'}\nedits:\n"
        "  - {site: attn_out_in, layers: 1, rows: last, op: subtract, run: aux}\n"
        "  - {site: attn_out_in, layers: 1, rows: last, op: scale, factor: 2.0}\n")
    res = CliRunner().invoke(app, ["explain", "a man", "-r", str(tmp_path / "r.yaml"),
                                                 "--model", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "inert edits" in res.output and "post_attention_layernorm" in res.output
    assert describe_inert([]) == "inert edits: none (every edit can change the read)"
