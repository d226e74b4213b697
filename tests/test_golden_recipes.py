"""Every shipped recipe gives the embeddings it gave before recipes compiled to edits (issue 12).

tests/golden/recipe-embeddings.npz was written by the engine of commit ca5a172 (before ``Plan.edits`` existed) with
``python tests/test_golden_recipes.py`` (which rewrites it from the current engine: do that only on purpose). The
edit-list engine reproduced the tiny-model arrays bit for bit on the machine that wrote them; since token-budget
batching (issue 13) regroups rows, padding-dependent float32 rounding is allowed: the suite's batch tolerance, 1e-4
relative (SmolLM2 moved by up to 3.4e-4 absolute in 4 of 92 arrays).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tpsurgery
from tpsurgery.library import RECIPE_DIR
from tpsurgery.testing import tiny_model

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "recipe-embeddings.npz"
TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field while a child watches",
         'He said "no"?', "x"]
TINY = ("llama", "gemma2", "gpt2", "falcon")
# issue 21's example recipes came after the golden file (their oracles: test_plan_facts.py, test_recipes_library.py)
AFTER_GOLDEN = {"smollm2-actadd-steering", "smollm2-head-ablation", "smollm2-layer-average"}
RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.stem.startswith("cp-")
                 and "-cp" not in p.stem and p.stem not in AFTER_GOLDEN)


def embed_all(model, tok, key: str) -> dict[str, np.ndarray]:
    """``{key/recipe: [4, d]}`` with prefix reuse at its default (batch 3) and ``{key/recipe/nocache}`` without (batch 2)."""
    out = {}
    for name in RECIPES:
        recipe = tpsurgery.load_recipe(RECIPE_DIR / f"{name}.yaml")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tpsurgery.apply(model, recipe, tokenizer=tok) as emb:
                out[f"{key}/{name}"] = emb.encode(TEXTS, batch_size=3)
            with tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=False) as emb:
                out[f"{key}/{name}/nocache"] = emb.encode(TEXTS, batch_size=2)
    return out


def check(got: dict[str, np.ndarray]) -> None:
    golden = np.load(GOLDEN)
    bad = []
    for k, v in got.items():
        want = golden[k]
        scale = max(float(np.abs(want).max()), 1e-6)
        if v.shape != want.shape or float(np.abs(v - want).max()) > 1e-4 * scale:
            bad.append(f"{k}: max diff {float(np.abs(v - want).max()) if v.shape == want.shape else v.shape}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", TINY)
def test_every_recipe_matches_the_pre_edits_engine_on_tiny_models(arch):
    model, tok = tiny_model(arch, n_layers=32, hidden=32)
    check(embed_all(model, tok, arch))


@pytest.mark.slow
def test_every_recipe_matches_the_pre_edits_engine_on_smollm2(smollm2):
    model, tok = smollm2
    check(embed_all(model, tok, "smollm2"))


if __name__ == "__main__":  # rewrite the golden file from the current engine
    torch.set_num_threads(1)
    arrays = {}
    for arch in TINY:
        arrays.update(embed_all(*tiny_model(arch, n_layers=32, hidden=32), arch))
    if "--no-smollm2" not in sys.argv:
        arrays.update(embed_all(*tpsurgery.load_model("smollm2-135m"), "smollm2"))
    np.savez_compressed(GOLDEN, **arrays)
    print(f"{len(arrays)} arrays -> {GOLDEN}")
