"""The benchmarks' baselines stay runnable and honest: the plain-hook backend and the naive full forward give the
engine's embeddings, and the shape benchmark runs end to end on the tiny shape (a benchmark that no longer imports,
as after the edits refactor, fails here instead of on the next GPU loan)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import tpsurgery
from tpsurgery.testing import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hooks import FullForwardBackend, HookBackend  # noqa: E402

TEXTS = ["a cat sat on the mat", "dogs bark", "x", "the quick brown fox jumps over the lazy dog"]


@pytest.mark.parametrize("recipe", [
    'prompt: "This sentence : <PST> \\"{text}\\" means in one word:\\""\ntp: {start: 1, stop: 3}\nexit_layer: 3',
    'prompt: "<PST> {text} means"\ntp: {start: 0, stop: 2}\nplaceholder: {init: zeros}\nexit_layer: -1',
    'prompt: "This sentence : \\"{text}\\" means in one word:\\""\nexit_layer: 2',
])
def test_hook_backend_equals_the_engine(recipe):
    model, tok = tiny_model("llama", n_layers=4)
    emb = tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=False)
    want = emb.encode(TEXTS, convert_to_numpy=False)
    emb.backend = HookBackend(model)
    got = emb.encode(TEXTS, convert_to_numpy=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_full_forward_backend_equals_the_engine_without_surgery():
    model, tok = tiny_model("llama", n_layers=4)
    emb = tpsurgery.apply(model, 'prompt: "{text} means"\nexit_layer: 2', tokenizer=tok, prefix_cache=False)
    want = emb.encode(TEXTS, convert_to_numpy=False)
    emb.backend = FullForwardBackend(model)
    torch.testing.assert_close(emb.encode(TEXTS, convert_to_numpy=False), want, rtol=1e-5, atol=1e-6)


def test_shape_benchmark_runs_on_the_tiny_shape(tmp_path, capsys):
    import shapes

    out = tmp_path / "shapes.json"
    assert shapes.main(["--shapes", "tiny", "--batch-sizes", "4", "--n", "8", "--n1", "2", "--rounds", "1",
                        "--out", str(out)]) == 0
    assert "peol / bare" in capsys.readouterr().out and out.is_file()


def test_joint_grid_benchmark_reaches_the_distinct_prefix_bound(tmp_path, capsys):
    import joint_grid

    out = tmp_path / "joint.json"
    assert joint_grid.main(["--layers", "6", "--stops", "2-3", "--cp-layers", "1,3", "--factors", "0.5,2", "--pairs",
                            "4", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    forwards = got["layer_forwards_per_batch"]
    assert forwards["joint"] == got["distinct_prefix_bound"] < forwards["per_variant"] < forwards["unshared"]
    assert got["max_cosine_difference_joint_vs_unshared"] < 1e-5 and got["cells"] == 4 * 3 * 6  # variants x rows x exits 1..6
