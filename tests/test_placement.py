"""Models placed by accelerate (``device_map``), tested on the CPU (issue 16).

A CPU has one device, so a real split over two accelerators cannot run here. What can: accelerate's dispatch with a
device map whose entries are ``cpu`` (in memory) and ``disk`` (offloaded: weights on the ``meta`` device, loaded by
accelerate's hooks when the module runs). That exercises everything that assumed ``next(model.parameters())`` is
where inputs go and that the model runs without hooks of its own. Not tested here (no second device): tensors
crossing devices between layers, and all-layer reads gathered from several devices (docs/scale-out.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpsurgery
from tpsurgery.cache import model_fingerprint
from tpsurgery.errors import ModelError
from tpsurgery.placement import input_device
from tpsurgery.prefix import compute_prefix
from tpsurgery.testing import tiny_model

accelerate = pytest.importorskip("accelerate")

TP = "prompt: 'This sentence : <PST> \"{text}\" means'\ntp: {start: 1, stop: 3}\nexit_layer: 3"
MASKS = TP + "\nplaceholder: {mask: first_layer}\nattention: {bidirectional: sentence}"
TEXTS = ["a b", "c d e", "hello world", "a b"]
LAYERS = {f"model.layers.{i}": d for i, d in enumerate(["cpu", "disk", "cpu", "disk"])}
SPLIT = {"model.embed_tokens": "cpu", **LAYERS, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


def _dispatched(tmp_path, device_map=SPLIT, dtype=torch.float32):
    model, tok = tiny_model("llama", n_layers=4, dtype=dtype)
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload")), tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_model_embeds_like_the_model_in_memory(tmp_path, dtype):
    plain, tok = tiny_model("llama", n_layers=4, dtype=dtype)
    model, _ = _dispatched(tmp_path, dtype=dtype)
    assert next(model.parameters()).device.type == "cpu" and model.model.layers[1].mlp.up_proj.weight.is_meta
    for recipe, kw in [(TP, {}), (MASKS, {}), (TP, {"all_layers": True})]:  # prefix reuse, mask edits, every layer
        with tpsurgery.apply(plain, recipe, tokenizer=tok) as emb:
            want = emb.encode(TEXTS, **kw)
        with tpsurgery.apply(model, recipe, tokenizer=tok, embedding_cache=tmp_path / "cache") as emb:
            got = emb.encode(TEXTS, **kw)
        assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-6, rtol=0)
    # the cache keys an offloaded model like the same weights in memory (it hashes the offloaded values)
    assert model_fingerprint(model) == model_fingerprint(plain)


def test_close_gives_accelerate_its_hooks_back(tmp_path):
    """nnsight takes over the instance ``forward`` slots accelerate uses; closing must put accelerate's back."""
    model, tok = _dispatched(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    before = model(input_ids=ids).logits
    with tpsurgery.apply(model, TP, tokenizer=tok) as emb:
        emb.encode(TEXTS)
    assert torch.equal(model(input_ids=ids).logits, before)  # offloaded layers still load their weights


def test_inputs_go_where_the_embedding_runs(tmp_path):
    """An offloaded embedding has meta weights: inputs go to accelerate's execution device, not the weights'."""
    model, tok = _dispatched(tmp_path, {**SPLIT, "model.embed_tokens": "disk"})
    assert next(model.parameters()).device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    prefix = compute_prefix(model, [5, 6, 7])  # runs the bare model on the prompt prefix
    want = compute_prefix(tiny_model("llama", n_layers=4)[0], [5, 6, 7])
    assert torch.equal(prefix.cache.layers[2].keys, want.cache.layers[2].keys)


def test_meta_weights_without_a_hook_are_a_model_error():
    with torch.device("meta"):
        model, _ = tiny_model("llama", n_layers=2)
    with pytest.raises(ModelError, match="model.embed_tokens.*meta device"):
        input_device(model)
    with pytest.raises(ModelError, match="meta device and no accelerate hook"):
        model_fingerprint(model)
