"""The paper's analyses (tpsurgery.analyze, ``tpsurgery analyze``; issue 22 item 3) against plain-hook oracles.

Dependency: HF ``output_hidden_states`` of one unpadded sentence with the recipe's TP done by hooks
(``recipe_oracle.hidden_for_row``), then ``scipy.stats.spearmanr`` between the last row and each other sentence row.
Attention: HF ``output_attentions`` of a separately built eager copy of the same seeded model, TP by a pre-hook on
each scheduled layer, written here from the recipe's ``tp`` fields.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import spearmanr
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.analyze import attention_mass, dependency_scores, eager_attention, spearman_to_pivot, without_tp
from tpsurgery.cli import app
from tpsurgery.errors import InputError, RecipeError
from tpsurgery.testing import tiny_model

from prop_support import decoder_parts
from recipe_oracle import hidden_for_row

TEXTS = ["a b c", "d e", "f g h i"]
TP = "name: tiny-tp\nprompt: 'This sentence : <PST> {text} means'\ntp: {start: 0, stop: 2}\nexit_layer: 3"
CP = TP.replace("tiny-tp", "tiny-tp-cp") + ("\nruns: {irr: 'The irrelevant : {text} means'}\nedits:\n"
                                            "  - {site: attn_out_in, layers: 1, rows: last, op: subtract, run: irr}\n"
                                            "  - {site: attn_out_in, layers: 1, rows: last, op: scale, factor: 0.5}")


def _apply(arch, recipe, **kw):
    model, tok = tiny_model(arch, n_layers=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tpsurgery.apply(model, recipe, tokenizer=tok, **kw)


@settings(max_examples=30)
@given(st.integers(2, 6), st.integers(3, 40), st.integers(0, 10**6))
def test_spearman_to_pivot_is_scipys(t, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, p = torch.randn(t, d, generator=g), torch.randn(d, generator=g)
    want = [spearmanr(x[k].numpy(), p.numpy()).statistic for k in range(t)]
    assert np.allclose(spearman_to_pivot(x, p).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dependency_scores_equal_the_hook_oracle_with_and_without_tp(arch):
    for recipe in (TP, "without"):
        emb = _apply(arch, TP)
        if recipe == "without":
            emb = _apply(arch, without_tp(emb.recipe))
        got = dependency_scores(emb, TEXTS, layers=(1, 3, -1))
        assert sorted(got) == [1, 3, 4]
        for b, row in enumerate(emb.tokenize(TEXTS, emb.recipe.templates[0])):
            hs = hidden_for_row(emb.model, row, emb.recipe, 3)  # the recipe restated with plain hooks
            for j in (1, 3, 4):
                h = hs[j][0]
                others = [p for p in range(*row.text_span) if p != len(row.ids) - 1]
                want = np.mean([spearmanr(h[p].numpy(), h[-1].numpy()).statistic for p in others])
                assert abs(got[j][b] - want) < 1e-4, (arch, recipe, b, j)


def _oracle_attention(arch, recipe, texts):
    """[n, H] masses on the placeholders (sentence queries, last query) with plain hooks on an eager copy."""
    emb = _apply(arch, recipe)
    model = tiny_model(arch, n_layers=4, attn="eager")[0]  # the same seeded weights, eager attention
    layers = decoder_parts(model)[0]
    tp = emb.recipe.tp
    tp_layers = {i for s in tp.spans for i in range(s.start, s.stop)}
    sent, last, count = 0.0, 0.0, 0
    for row in emb.tokenize(texts, emb.recipe.templates[0]):
        ph = list(row.placeholders)

        def pre(mod, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[0, ph] = h[0, len(row.ids) + tp.source].clone()
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handles = [layers[i].register_forward_pre_hook(pre, with_kwargs=True) for i in sorted(tp_layers)]
        try:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([row.ids]), output_attentions=True, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        a = torch.stack(out.attentions)[:, 0]  # [n, H, L, L]
        on = a[..., ph].sum(-1)
        sent = sent + on[..., row.text_span[0]:row.text_span[1]].sum(-1)
        count += row.text_span[1] - row.text_span[0]
        last = last + on[..., -1]
    return sent / count, last / len(texts)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_mass_equals_the_hook_oracle_and_restores_the_attention(arch):
    emb = _apply(arch, TP)
    got = attention_mass(emb, TEXTS, batch_size=2)
    sent, last = _oracle_attention(arch, TP, TEXTS)
    assert np.allclose(got["sentence"], sent.numpy(), atol=1e-5)
    assert np.allclose(got["last"], last.numpy(), atol=1e-5)
    assert emb.model.config._attn_implementation == "sdpa"  # switched to eager for the analysis only


def test_cp_changes_only_the_last_tokens_attention_after_its_layer():
    tp, cp = (attention_mass(_apply("llama", r), TEXTS) for r in (TP, CP))
    assert np.allclose(tp["sentence"], cp["sentence"], atol=1e-6)  # sentence tokens precede the edited last row
    assert np.allclose(tp["last"][:2], cp["last"][:2], atol=1e-6)  # layers 0-1: before the edit reaches attention
    assert np.abs(tp["last"][2:] - cp["last"][2:]).max() > 1e-5  # tiny random model: small but far above rounding


def test_eager_attention_is_restored_after_an_error():
    model = tiny_model("llama", n_layers=2)[0]
    with pytest.raises(RuntimeError):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_refusals():
    with pytest.raises(RecipeError, match="no TP to remove"):
        without_tp(_apply("llama", "prompt: '<PST> {text}'").recipe)
    with pytest.raises(RecipeError, match="needs a prompt with a <PST>"):
        attention_mass(_apply("llama", "prompt: 'A {text} means'"), TEXTS)
    with pytest.raises(InputError, match="1..4"):
        dependency_scores(_apply("llama", TP), TEXTS, layers=(0,))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model("llama", n_layers=4)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return path


def test_cli_writes_json_markdown_and_png(folder, tmp_path):
    (tmp_path / "tp.yaml").write_text(TP)
    (tmp_path / "cp.yaml").write_text(CP)
    common = ["-m", str(folder), "-i", str(folder / "texts.txt"), "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(app, ["analyze", "dependency", "-r", str(tmp_path / "tp.yaml"), "--layers", "2,-1",
                                 *common])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "dependency-tiny-tp.json").read_text())
    assert list(report["results"]) == ["tiny-tp", "tiny-tp without tp"] and report["n_texts"] == 3
    assert list(report["results"]["tiny-tp"]) == ["2", "4"]
    assert len(report["results"]["tiny-tp"]["4"]["scores"]) == 3
    assert "| 4 |" in (tmp_path / "out" / "dependency-tiny-tp.md").read_text()
    assert (tmp_path / "out" / "dependency-tiny-tp.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, ["analyze", "attention", "-r", str(tmp_path / "tp.yaml"), "--with",
                                 str(tmp_path / "cp.yaml"), "--without-tp", *common])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "attention-tiny-tp.json").read_text())
    assert list(report["results"]) == ["tiny-tp", "tiny-tp without tp", "tiny-tp-cp"]
    assert np.asarray(report["results"]["tiny-tp-cp"]["last"]).shape == (4, 4)
    assert (tmp_path / "out" / "attention-tiny-tp.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, ["analyze", "dependency", "-r", str(tmp_path / "tp.yaml"), "--limit", "0", *common])
    assert isinstance(r.exception, InputError) and "--limit" in str(r.exception)
