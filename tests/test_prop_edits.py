"""Edits as data (issue 12): random edit lists on random tiny decoders == a plain-hook reference (tests/edit_oracle.py);
errors of the ``edits`` section name the field; an architecture without an o_proj-like module says so.

The batch-invariance, shape and model-untouched properties also draw random edit lists (``engine_recipes(surgery=True)``
in test_prop_engine.py, test_prop_shapes.py, test_prop_untouched.py; sharing in test_prop_sharing.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tpsurgery
from edit_oracle import o_proj, reference_read
from prop_support import byte_encode, decoder_parts, max_length, model_for
from strategies import archs, scaled, surgery_sections, templates
from tpsurgery.testing import ARCHS, tiny_model

N = 4
TEXTS = st.lists(st.text(st.characters(min_codepoint=97, max_codepoint=122) | st.just(" "), min_size=1, max_size=12),
                 min_size=1, max_size=4)


def vector(e: dict, size: int) -> torch.Tensor:
    """The documented named vectors, restated: zeros, ones, U[0,1) and N(mean, std) from a seeded generator."""
    if isinstance(e["value"], list):
        return torch.tensor(e["value"], dtype=torch.float32)
    if e["value"] == "zeros":
        return torch.zeros(size)
    if e["value"] == "ones":
        return torch.ones(size)
    g = torch.Generator().manual_seed(e.get("seed", 0))
    if e["value"] == "uniform":
        return torch.rand(size, generator=g)
    return torch.randn(size, generator=g) * e.get("std", 1.0) + e.get("mean", 0.0)


def expand(model, raw: list[dict]) -> list[dict]:
    """The recipe's edit entries, one dict per layer, with defaults and write vectors (layers ascending is not needed:
    the reference groups by site and layer, keeping list order inside a group)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    width = o_proj(model, decoder_parts(model)[0][0]).weight.shape
    width = width[1] if model.config.model_type != "gpt2" else width[0]
    out = []
    for e in raw:
        layers = [0] if e["site"] == "embed" else e["layers"] if isinstance(e["layers"], list) else [e["layers"]]
        for i in layers:
            d = {"rows": "placeholders", "source": -1, "alpha": 1.0, "eps": 0.0, **e, "layer": i}
            if "value" in e:
                d["vector"] = vector(e, width if e["site"] == "attn_out_in" else hidden)
            out.append(d)
    return out


@scaled(0.5)
@given(data=st.data())
def test_random_edit_lists_match_the_hook_reference(data):
    arch = data.draw(archs(), label="arch")
    model, tok = model_for(arch)
    template = data.draw(templates(), label="template")
    has_marker = "<PST>" in template
    section = data.draw(surgery_sections(N, has_marker), label="edits")
    exit_layer = data.draw(st.integers(0, N), label="exit")
    recipe = tpsurgery.parse_recipe({"prompt": template, "exit_layer": exit_layer, **section})
    texts = data.draw(TEXTS, label="texts")
    rows = [byte_encode(template, t, ph_id=0, bos=False, preprocessing=True, official=False, limit=max_length(model))
            for t in texts]
    assume(all(r is not None and len(r.ids) > 0 for r in rows))
    batch_size = data.draw(st.integers(1, 4))
    # prompt-prefix reuse on and off: both must equal the reference (edits before the placeholder included)
    got = {cache: tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=cache).encode(texts, batch_size=batch_size)
           for cache in (True, False)}
    edits = expand(model, section["edits"])
    for k, (text, row) in enumerate(zip(texts, rows)):
        runs = {name: byte_encode(t, text, ph_id=0, bos=False, preprocessing=True, official=False,
                                  limit=max_length(model)).ids for name, t in section.get("runs", {}).items()}
        want = reference_read(model, list(row.ids), list(row.placeholders), edits, exit_layer, runs,
                              row.text_span)[-1]
        for cache, out in got.items():
            err = float((torch.as_tensor(out[k]) - want).abs().max() / want.abs().max().clamp(min=1e-6))
            assert err <= 1e-4, f"sentence {k}, prefix_cache={cache}: relative error {err:.2e}"


def test_transformer_lens_runs_edit_lists_like_nnsight():
    model, tok = tiny_model("llama", n_layers=4)
    recipe = tpsurgery.parse_recipe({
        "prompt": 'x : <PST> "{text}" means', "tp": {"start": 1, "stop": 3}, "exit_layer": 4,
        "runs": {"aux": 'y : "{text}" means'},
        "edits": [{"site": "attn_out_in", "layers": 2, "rows": "last", "op": "subtract", "run": "aux"},
                  {"site": "attn_out_in", "layers": 2, "rows": "last", "op": "recover_norm", "eps": 1e-7, "heads": [1]},
                  {"site": "layer_out", "layers": [0, 3], "rows": "placeholders", "op": "scale", "factor": 0.5},
                  {"site": "embed", "op": "write", "value": "gaussian", "seed": 3}]})
    texts = ["a b c", "hello there friend"]
    nn = tpsurgery.apply(model, recipe, tokenizer=tok).encode(texts)
    tl = tpsurgery.apply(model, recipe, tokenizer=tok, backend="transformer_lens").encode(texts)
    plain = tpsurgery.apply(model, recipe.replace(edits=[]), tokenizer=tok).encode(texts)
    assert np.abs(nn - tl).max() <= 1e-5 * np.abs(nn).max()
    assert np.abs(nn - plain).max() > 1e-3  # the edits do something


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_has_an_attention_output_projection(arch):
    model, tok = tiny_model(arch, n_layers=2)
    recipe = {"prompt": '"{text}" means', "edits": [{"site": "attn_out_in", "layers": 1, "rows": "last",
                                                      "op": "scale", "factor": 0.0}]}
    with tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=False) as emb:
        zeroed = emb.encode(["a b"])
    with tpsurgery.apply(model, {**recipe, "edits": []}, tokenizer=tok, prefix_cache=False) as emb:
        plain = emb.encode(["a b"])
    assert np.abs(zeroed - plain).max() > 0


def test_a_family_without_a_known_projection_is_refused_with_the_fix():
    model, tok = tiny_model("llama", n_layers=2)
    spec = tpsurgery.ArchSpec("model.layers", "model.embed_tokens", "model.norm", attn_out=None)
    tpsurgery.register_architecture("llama_no_oproj", spec)
    model.config.model_type = "llama_no_oproj"
    try:
        with pytest.raises(tpsurgery.ModelError, match=r"edits.0.*attn_out_in.*register_architecture"):
            tpsurgery.apply(model, {"prompt": "{text}.", "edits": [{"site": "attn_out_in", "layers": 1, "rows": "last",
                                                                    "op": "scale", "factor": 2}]}, tokenizer=tok)
    finally:
        from tpsurgery.arch import ARCHITECTURES

        del ARCHITECTURES["llama_no_oproj"]
        model.config.model_type = "llama"


@pytest.mark.parametrize("edits, field, words", [
    ([{"site": "layer_in", "layers": 9, "op": "scale", "factor": 2}], "edits.0.layers", "allowed: 0..3"),
    ([{"site": "attn_out_in", "layers": 1, "op": "scale", "factor": 2, "heads": [7]}], "edits.0.heads", "allowed: 0..3"),
    ([{"site": "layer_in", "layers": 1, "op": "write", "value": [1.0, 2.0]}], "edits.0.value", "2 numbers"),
    ([{"site": "layer_in", "layers": 1, "op": "subtract", "run": "nope", "rows": "last"}], "edits.0.run", "no run named"),
    ([{"site": "layer_in", "layers": 1, "op": "scale"}], "edits.0.factor", "op scale needs `factor`"),
    ([{"site": "layer_in", "layers": 1, "op": "copy", "factor": 2}], "edits.0.factor",
     "not a parameter of op copy (its parameters: source, alpha"),
    ([{"site": "layer_in", "layers": 1, "op": "frob"}], "edits.0", "unknown op 'frob' (allowed: write, copy, add"),
    ([{"site": "layer_in", "layers": 1, "op": "add"}], "edits.0", "needs exactly one of `run`"),
    ([{"site": "layer_in", "layers": 1, "op": "add", "run": "aux", "value": "ones", "rows": "last"}], "edits.0",
     "needs exactly one of `run`"),
    ([{"site": "layer_in", "layers": 1, "op": "add", "run": "aux", "rows": "all"}], "edits.0.rows",
     "counted from the end (not 'all')"),
    ([{"site": "layer_in", "layers": 1, "op": "add", "value": "v.npy"}], "edits.0.value", "cannot read the vector"),
    ([{"site": "layer_in", "layers": 1, "op": "scale", "factor": 2, "rows": {"start": 2, "stop": 1}}],
     "edits.0.rows", "0 <= start < stop"),
    ([{"site": "layer_in", "layers": 1, "op": "scale", "factor": 2, "rows": [0, 0]}], "edits.0.rows", "repeat"),
    ([{"site": "embed", "layers": 1, "op": "scale", "factor": 2}], "edits.0", "takes no `layers`"),
    ([{"site": "layer_in", "op": "scale", "factor": 2}], "edits.0", "needs `layers`"),
    ([{"site": "layer_in", "layers": 1, "op": "hide"}], "edits.0", "op 'hide' does not apply at site"),
    ([{"site": "layer_out", "layers": 1, "op": "scale", "factor": 2, "heads": [0]}], "edits.0", "attn_out_in only"),
    ([{"site": "layer_in", "layers": 1, "op": "scale", "factor": 2, "rows": "everything"}], "edits.0.rows",
     "'placeholders', 'last', 'all', 'sentence' or 'prompt'"),
])
def test_edit_errors_name_the_field(edits, field, words):
    model, tok = tiny_model("llama", n_layers=4)
    recipe = {"prompt": '<PST> "{text}" means', "runs": {"aux": "{text} x"}, "edits": edits}
    with pytest.raises(tpsurgery.RecipeError) as err:
        tpsurgery.apply(model, recipe, tokenizer=tok)
    assert err.value.field == field and words in str(err.value)
