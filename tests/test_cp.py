"""Contrastive Prompting recipes (issue 12): the engine == the plain-hook CP oracle (tests/cp_oracle.py), written
from the official code, within 1e-5 relative, on tiny models of all 12 families (each has an o_proj-like module,
so none is refused) and on SmolLM2, for the scaled and norm variants and for TP + CP in one recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpsurgery
from cp_oracle import CP, cp_embed
from tpsurgery.testing import ARCHS, tiny_model

AUX = 'The irrelevant information of this sentence : "{text}" means in one word:"'
TEXTS = ["A man is playing a guitar.", "Two dogs run in the snow", "x"]


def cp_recipe(prompt: str, layer: int, mode: str, coeff: float, exit_layer: int, tp: dict | None = None) -> dict:
    second = ({"op": "scale", "factor": coeff} if mode == "scaled" else {"op": "recover_norm", "eps": 1e-7})
    return {"prompt": prompt, "exit_layer": exit_layer, "tp": tp or {}, "runs": {"irrelevant": AUX},
            "edits": [{"site": "attn_out_in", "layers": layer, "rows": "last", "op": "subtract", "run": "irrelevant"},
                      {"site": "attn_out_in", "layers": layer, "rows": "last", **second}]}


def check(model, tok, recipe: dict, cp: CP, tp_layers: tuple[int, ...] = ()):
    with tpsurgery.apply(model, recipe, tokenizer=tok) as emb:
        got = torch.as_tensor(emb.encode(TEXTS, batch_size=2))
        rows = emb.tokenize(TEXTS, emb.recipe.templates[0])
        aux = emb.tokenize(TEXTS, AUX)
        tp = {"source": -1, "tp_layers": tp_layers, "alpha": 1.0, "init_vector": None} if tp_layers else None
        want = cp_embed(model, rows, aux, cp, emb.plan.exit_layer, tp=tp)
        plain = torch.as_tensor(tpsurgery.apply(model, {**recipe, "edits": []}, tokenizer=tok).encode(TEXTS))
    err = float(((got - want).abs().amax(-1) / want.abs().amax(-1)).max())
    assert err <= 1e-5, f"relative error {err:.2e}"
    assert float((got - plain).abs().max()) > 1e-4  # CP changed the embedding


@pytest.mark.parametrize("mode", ["scaled", "norm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cp_equals_the_oracle(arch, mode):
    model, tok = tiny_model(arch, n_layers=4)
    recipe = cp_recipe('This sentence : "{text}" means in one word:"', 2, mode, 2.0, 3)
    check(model, tok, recipe, CP(2, mode, 2.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_and_cp_in_one_recipe_equal_the_oracle(arch):
    model, tok = tiny_model(arch, n_layers=4)
    recipe = cp_recipe('This sentence : <PST> "{text}" means in one word:"', 2, "scaled", 3.0, 4, tp={"start": 1, "stop": 3})
    check(model, tok, recipe, CP(2, "scaled", 3.0), tp_layers=(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("name, tp_layers", [("cp-prompteol", ()), ("cp-prompteol-norm", ()),
                                             ("prompteol-tp-cp", tuple(range(1, 8))),
                                             ("smollm2-cp-prompteol", ()), ("smollm2-prompteol-tp-cp", (1,))])
def test_shipped_cp_recipes_equal_the_oracle_on_smollm2(smollm2, name, tp_layers):
    model, tok = smollm2
    recipe = tpsurgery.load_recipe(name)
    e = recipe.edits
    mode = "scaled" if e[1].op == "scale" else "norm"
    check(model, tok, recipe.to_dict(), CP(e[0].layer_list()[0], mode, getattr(e[1], "factor", None) or 1.0), tp_layers)


def test_shipped_cp_recipes_keep_working_with_another_exit_layer():
    for name in ("cp-prompteol", "cp-prompteol-norm", "cp-cot", "cp-cot-norm", "cp-knowledge", "cp-knowledge-norm",
                 "prompteol-tp-cp", "smollm2-cp-prompteol", "smollm2-prompteol-tp-cp"):
        r = tpsurgery.load_recipe(name)
        assert r.replace(exit_layer=10).edits == r.edits and r.runs["irrelevant"] == AUX
