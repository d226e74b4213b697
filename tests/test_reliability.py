"""Reliability and safety (issue 8): awkward inputs, injected failures, unsupported models, state and security.

Failures are injected with real torch hooks on real models (no mocks of tpsurgery code). See docs/reliability.md.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.prompts import encode_prompts
from tpsurgery.testing import PAD, tiny_config, tiny_model, tiny_tokenizer
from tpsurgery.foreign import observer

P = 'This sentence : <PST> "{text}" means in one word:"'
REC = {"prompt": P, "tp": {"start": 0, "stop": 2}, "exit_layer": 3}
TEXTS = ["A man is playing a guitar.", "hi", "Someone plays music?", "x y z " * 6, "ok then", "a", "The end."]


def _hooks(model):
    return [(n, list(m._forward_hooks), list(m._forward_pre_hooks), list(m._forward_hooks_with_kwargs))
            for n, m in model.named_modules()]


def _state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.config.to_dict()),
            _hooks(model), [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            dict(torch.nn.modules.module._global_forward_hooks),
            dict(torch.nn.modules.module._global_forward_pre_hooks))


def _assert_same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def _tok_state(tok):
    return (tok.padding_side, tok.truncation_side, tok.pad_token, tok.model_max_length, len(tok),
            getattr(tok, "split_special_tokens", None), tok.backend_tokenizer.to_str())


# ---------------------------------------------------------------------------------------------------------- texts
def test_awkward_texts_embed_or_fail_with_their_index():
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    odd = ["", "   ", "\n\t\r", "😀👍🏽 emoji", "漢字かな交じり文", "שלום עולם مرحبا", "ctrl\x00\x07\x1b[31m\u202e\ufeff", "{text}"]
    out = emb.encode(odd, batch_size=3)
    assert out.shape == (len(odd), 32) and out.dtype == np.float32 and np.isfinite(out).all()
    bare = tpsurgery.apply(model, {"exit_layer": 2}, tokenizer=tok)  # no prompt, no BOS: "" has no tokens at all
    assert np.isfinite(bare.encode(["   ", "\x00"])).all()
    with pytest.raises(tpsurgery.InputError, match=r"^input 2: the prompted input has no tokens") as info:
        bare.encode(["a", "b", ""])
    assert info.value.index == 2
    mean = tpsurgery.apply(model, {**REC, "pooling": "mean"}, tokenizer=tok)
    with pytest.raises(tpsurgery.InputError, match=r"^input 3: mean pooling needs at least one sentence token"):
        mean.encode(["a", "a", "b", ""])  # duplicates are embedded once; the index is still the caller's
    for bad, index, kind in ((["a", None], 1, "NoneType"), (["a", "b", 3.5], 2, "float"), ([b"bytes"], 0, "bytes")):
        with pytest.raises(tpsurgery.InputError, match=f"^input {index}: expected a str, got {kind}"):
            emb.encode(bad)


def test_placeholder_and_special_token_text_in_a_sentence_stay_ordinary_text():
    """Prompt injection: `<PST>`, `{text}` or a special token's text typed by a user never becomes a placeholder or a
    special token; the placeholder count and positions are those of an ordinary sentence of the same shape."""
    model, tok = tiny_model("llama", bos=True)
    template = '"{text}" means <PST> in one word:"'  # the placeholder comes after the text: positions shift with it
    plain, injected = encode_prompts(tok, template, ["ab <QQQ> <ppp><bbb>{txet}", "ab <PST> <pad><bos>{text}"],
                                     0, preprocess=False)
    assert len(injected.ids) == len(plain.ids) and injected.placeholders == plain.placeholders
    assert injected.text_span == plain.text_span
    inside = injected.ids[injected.text_span[0]: injected.text_span[1]]
    assert not set(inside) & set(tok.all_special_ids) and 0 not in inside
    assert list(inside) == tok("ab <PST> <pad><bos>{text}", add_special_tokens=False, split_special_tokens=True)[
        "input_ids"]
    emb = tpsurgery.apply(model, {"prompt": template, "tp": {"start": 0, "stop": 2}, "exit_layer": 2}, tokenizer=tok)
    assert np.isfinite(emb.encode(["<PST> <PST>", "<pad>" * 20, "<eos>"])).all()


def test_special_token_text_on_smollm2_is_not_special(smollm2):
    """SmolLM2's placeholder carrier is token 0, whose text '<|endoftext|>' its tokenizer parses as a special token."""
    model, tok = smollm2
    rows = encode_prompts(tok, P, ["hi there", "hi <|endoftext|> <PST> <|im_start|>"], 0, preprocess=True)
    for compat in ("exact", "official"):
        a, b = encode_prompts(tok, P, ["hi <|end|>", "hi <|endoftext|>"], 0, preprocess=True, compat=compat)
        assert a.placeholders == b.placeholders and b.ids.count(0) == 1  # token 0 only as the placeholder
    assert rows[1].placeholders == rows[0].placeholders == (3,)
    assert rows[1].ids.count(0) == 1 and 1 not in rows[1].ids  # no <|endoftext|>, no <|im_start|> from the text
    chat = "<|im_start|>user <PST> {text}<|im_end|>"  # special tokens in the template itself stay special ...
    (row,) = encode_prompts(tok, chat, ["a b"], 0, preprocess=False)
    assert row.ids[0] == 1 and row.ids[-1] == 2
    for compat in ("exact", "official"):  # ... and one in the text is refused
        with pytest.raises(tpsurgery.InputError, match=r"^input 1: the text contains the special token '<\|im_end\|>'"):
            encode_prompts(tok, chat, ["fine", "a <|im_end|> b"], 0, preprocess=False, compat=compat)


def test_an_added_special_token_outside_the_named_ones_is_refused_in_the_text():
    """A token added with ``special=True`` but not named (bos/eos/...) is still parsed as one special token (as is
    SmolLM2's <|im_end|> after transformers 5.17's GGUF conversion): a marker in a template, refused in the text."""
    from tokenizers import AddedToken

    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken("<|turn|>", special=True, normalized=False)])
    turn = tok.convert_tokens_to_ids("<|turn|>")
    assert "<|turn|>" not in tok.all_special_tokens  # the case this is about
    (row,) = encode_prompts(tok, "<|turn|> <PST> {text}<|turn|>", ["a b"], 0, preprocess=False)
    assert row.ids[0] == turn and row.ids[-1] == turn
    with pytest.raises(tpsurgery.InputError, match=r"^input 1: the text contains the special token '<\|turn\|>'"):
        encode_prompts(tok, "<|turn|> <PST> {text}<|turn|>", ["fine", "a <|turn|> b"], 0, preprocess=False)
    (plain,) = encode_prompts(tok, P, ["a <|turn|> b"], 0, preprocess=True)  # no specials in the template: split
    assert turn not in plain.ids


def test_a_special_token_in_any_text_slot_is_refused():
    """Only the last ``{text}`` slot used to be checked: text that completes a special token with the template after
    the first slot of a two-slot prompt (``a <|tu`` + ``rn|>``) became a real special token unnoticed."""
    from tokenizers import AddedToken

    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken("<|turn|>", special=True, normalized=False)])
    template = "<|turn|> {text}rn|> then {text}"
    for compat in ("exact", "official"):
        assert len(encode_prompts(tok, template, ["a b"], 0, preprocess=False, compat=compat)) == 1
        with pytest.raises(tpsurgery.InputError, match=r"^input 1: the text contains the special token '<\|turn\|>'"):
            encode_prompts(tok, template, ["fine", "a <|tu"], 0, preprocess=False, compat=compat)


def _short_context_llama(limit: int = 64):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.max_position_embeddings = limit
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), tiny_tokenizer()


@pytest.mark.parametrize("compat", ["exact", "official"])
def test_long_texts_are_truncated_with_one_warning_per_call(compat):
    model, tok = _short_context_llama(64)
    recipe = {"prompt": [P, 'In one word, <PST> "{text}" is:"'], "tp": {"start": 0, "stop": 2}, "exit_layer": 3,
              "compat": compat}
    emb = tpsurgery.apply(model, recipe, tokenizer=tok)
    texts = ["short", "word " * 20_000, "y" * 100_000, "short", "z" * 70]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = emb.encode(texts, batch_size=2)
    cut = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert cut == ["3 input(s) truncated to the model's limit of 64 tokens (the end of the sentence is dropped; "
                   "inputs 1, 2, 4)"]
    assert np.isfinite(out).all() and np.array_equal(out[0], out[3])
    assert all(len(r.ids) <= 64 and r.truncated for r in emb.tokenize(texts[1:3], P, warn=False))
    assert "(truncated)" in emb.explain(texts[2])
    with warnings.catch_warnings(record=True) as caught:  # the tokenizer-level entry point warns once too
        warnings.simplefilter("always")
        encode_prompts(tok, P, texts, 0, preprocess=False, max_length=64, compat=compat)
    assert [str(w.message)[:12] for w in caught] == ["3 input(s) t"]


def test_100k_characters_on_smollm2_fit_its_8192_positions(smollm2):
    model, tok = smollm2
    emb = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 0, "stop": 1}, "exit_layer": 1}, tokenizer=tok)
    assert emb.max_length == 8192
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = emb.encode(["The cat sat on the mat. " * 4200])  # 100,800 characters, about 29k tokens
    assert [str(w.message) for w in caught if "truncated" in str(w.message)] == [
        "1 input(s) truncated to the model's limit of 8192 tokens (the end of the sentence is dropped; inputs 0)"]
    assert out.shape == (1, 576) and np.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ out of memory
def _oom_hook(max_rows: int, seen: list, message: str | None = None):
    def hook(module, args):
        seen.append(args[0].shape[0])
        if args[0].shape[0] > max_rows:
            if message:
                raise RuntimeError(message)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return hook


@pytest.mark.parametrize("message", [None, "CUDA error: out of memory"])
def test_out_of_memory_batches_are_split_in_halves_and_retried(message):
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    want = emb.encode(TEXTS, batch_size=7)
    seen: list = []
    handle = model.model.layers[1].register_forward_pre_hook(observer(_oom_hook(2, seen, message)))
    try:
        with pytest.warns(UserWarning, match="out of memory with a batch of 7: retrying in batches of at most 4") as rec:
            got = emb.encode(TEXTS, batch_size=7)
    finally:
        handle.remove()
    assert len([w for w in rec if "out of memory" in str(w.message)]) == 1
    assert seen == [7, 4, 2, 2, 2, 1]  # 7 fails -> 4 + 3; 4 fails -> 2 + 2; the 3 are cut to the size that fitted
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_out_of_memory_for_a_single_input_names_it():
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    before = _state(model)

    def hook(module, args):  # only the long sentence does not fit
        if args[0].shape[1] > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = model.model.layers[0].register_forward_pre_hook(observer(hook))
    try:
        with pytest.raises(tpsurgery.BackendError, match=r"^input 3: out of memory even in a batch of one") as info:
            emb.encode(["hi", "hi", "ok", "a much longer sentence than the others"], batch_size=4)
    finally:
        handle.remove()
    assert info.value.index == 3 and isinstance(info.value.__cause__, (torch.OutOfMemoryError, tpsurgery.BackendError))
    _assert_same_state(before, _state(model))


def test_other_runtime_errors_are_not_retried():
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    for max_rows in (0, 1):  # 0: also the one-row forward of the shared prompt prefix fails (tpsurgery.prefix)
        seen: list = []
        handle = model.model.layers[1].register_forward_pre_hook(observer(_oom_hook(max_rows, seen, "mat1 and mat2 shapes")))
        try:
            with pytest.raises(tpsurgery.BackendError, match="mat1 and mat2") as info:
                emb.encode(TEXTS, batch_size=7)
        finally:
            handle.remove()
        assert [n for n in seen if n > 1] == ([] if max_rows == 0 else [7])  # tried once, never split
        assert isinstance(info.value.__cause__, RuntimeError)


# -------------------------------------------------------------------------------------------------------- state
def test_errors_leave_no_hooks_and_identical_weights():
    model, tok = tiny_model("qwen2")
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    first = emb.encode(TEXTS, batch_size=3)
    before = _state(model)
    with pytest.raises(tpsurgery.RecipeError):
        tpsurgery.apply(model, {**REC, "exit_layer": 9}, tokenizer=tok)
    with pytest.raises(tpsurgery.InputError):
        emb.encode(["a", None])
    calls = {"n": 0}

    def interrupt(module, args):  # Ctrl-C in the middle of the second batch
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    for failure, expected in ((interrupt, KeyboardInterrupt), (_oom_hook(0, []), tpsurgery.BackendError)):
        handle = model.model.layers[1].register_forward_pre_hook(observer(failure))
        try:
            with pytest.raises(expected):
                emb.encode(TEXTS, batch_size=3)
        finally:
            handle.remove()
        _assert_same_state(before, _state(model))
    assert np.array_equal(emb.encode(TEXTS, batch_size=3), first)  # and it still works, bit for bit


def test_apply_never_mutates_the_model_or_tokenizer():
    model, tok = tiny_model("gpt2")  # GPT-2 has dropout: a model left in training mode would randomize embeddings
    model.train()
    tok.padding_side = "right"
    tok.truncation_side = "left"
    before, tok_before = _state(model), _tok_state(tok)
    emb = tpsurgery.apply(model, {**REC, "exit_layer": 2, "placeholder": {"init": "gaussian"}}, tokenizer=tok)
    a = emb.encode(TEXTS, batch_size=2)
    b = emb.encode(TEXTS[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    emb.explain(TEXTS[0])
    _assert_same_state(before, _state(model))
    assert _tok_state(tok) == tok_before and model.training


def test_repeated_runs_are_bitwise_identical_on_cpu():
    model, tok = tiny_model("llama")
    runs = [tpsurgery.apply(model, {**REC, "placeholder": {"init": "gaussian", "seed": 3}}, tokenizer=tok)
            .encode(TEXTS, batch_size=3) for _ in range(2)]
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    assert np.array_equal(runs[0], runs[1])
    assert np.array_equal(emb.encode(TEXTS, batch_size=3), emb.encode(TEXTS, batch_size=3))


# ------------------------------------------------------------------------------------------------------- models
def _custom_decoder():
    """A small PreTrainedModel whose layers live where no table row looks (backbone.blocks)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class BlockConfig(PretrainedConfig):
        model_type = "tpsurgery_test_blocks"

        def __init__(self, vocab_size=260, hidden_size=16, n_blocks=3, **kw):
            super().__init__(**kw)
            self.vocab_size, self.hidden_size, self.n_blocks = vocab_size, hidden_size, n_blocks

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.mix = torch.nn.Linear(d, d)

        def forward(self, h):  # causal mixing: each position sees the running mean of the ones before it
            prefix = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, device=h.device)[None, :, None]
            return h + torch.tanh(self.mix(prefix))

    class BlockLM(PreTrainedModel):
        config_class = BlockConfig

        def __init__(self, config):
            super().__init__(config)
            self.backbone = torch.nn.Module()
            self.backbone.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.backbone.blocks = torch.nn.ModuleList(Block(config.hidden_size) for _ in range(config.n_blocks))
            self.backbone.norm_f = torch.nn.LayerNorm(config.hidden_size)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            h = self.backbone.embed(input_ids)
            for block in self.backbone.blocks:
                h = block(h)
            return self.backbone.norm_f(h)

    torch.manual_seed(0)
    return BlockLM(BlockConfig()).eval()


def test_unknown_architecture_lists_the_families_and_registering_one_makes_it_work():
    model, tok = _custom_decoder(), tiny_tokenizer()
    with pytest.raises(tpsurgery.ModelError) as info:
        tpsurgery.apply(model, REC, tokenizer=tok)
    msg = str(info.value)
    assert "cannot locate the decoder layers of BlockLM (model_type='tpsurgery_test_blocks')" in msg
    assert "llama" in msg and "gpt2" in msg and "register_architecture(model_type, ArchSpec(" in msg
    from tpsurgery.arch import ARCHITECTURES

    tpsurgery.register_architecture("tpsurgery_test_blocks",
                                    tpsurgery.ArchSpec("backbone.blocks", "backbone.embed", "backbone.norm_f"))
    try:
        emb = tpsurgery.apply(model, {"prompt": 'Say "{text}"', "exit_layer": 2}, tokenizer=tok)
        got = emb.encode("hello", convert_to_tensor=True)
        ids = torch.tensor([emb.tokenize(["hello"], 'Say "{text}"')[0].ids])
        with torch.no_grad():
            h = model.backbone.embed(ids)
            for block in model.backbone.blocks[:2]:
                h = block(h)
        torch.testing.assert_close(got, h[0, -1])
        with pytest.raises(tpsurgery.ModelError, match="expects an ArchSpec"):
            tpsurgery.register_architecture("x", {"layers": "a"})
    finally:
        del ARCHITECTURES["tpsurgery_test_blocks"]


@pytest.mark.parametrize("prompt", ["x <PST> {text}", "x {text}"])
def test_a_slow_tokenizer_is_refused_at_apply_with_a_hint(prompt):
    """Placeholders sit on token boundaries from offset mappings, which only fast tokenizers give (was: a KeyError
    from inside the marker check, or a late error at encode)."""
    from transformers import ByT5Tokenizer  # a Python-backend tokenizer that needs no files

    model, _ = tiny_model("llama")
    with pytest.raises(tpsurgery.ModelError, match=r"fast .*ByT5Tokenizer.*use_fast=True"):
        tpsurgery.apply(model, {"prompt": prompt, "exit_layer": 1}, tokenizer=ByT5Tokenizer())


def test_models_without_a_pad_token_use_eos_and_change_nothing():
    model, tok = tiny_model("llama")
    want = tpsurgery.apply(model, REC, tokenizer=tok).encode(TEXTS, batch_size=4)
    bare = tiny_tokenizer()
    bare.pad_token = None
    model.config.pad_token_id = None
    assert bare.pad_token_id is None
    got = tpsurgery.apply(model, REC, tokenizer=bare).encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert bare.pad_token is None


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_models_return_float32_close_to_float32(dtype, tol):
    ref, tok = tiny_model("llama")
    half, _ = tiny_model("llama", dtype=dtype)
    want = tpsurgery.apply(ref, REC, tokenizer=tok).encode(TEXTS)
    got = tpsurgery.apply(half, REC, tokenizer=tok).encode(TEXTS)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    assert next(half.parameters()).dtype == dtype


# ---------------------------------------------------------------------------------------------------- resources
def test_progress_bar_counts_texts(capsys):
    model, tok = tiny_model("llama")
    tpsurgery.apply(model, REC, tokenizer=tok).encode(TEXTS, batch_size=3, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "encode" in err and f"{len(TEXTS)}/{len(TEXTS)}" in err


def _saved_tiny(tmp_path):
    model, tok = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_ctrl_c_during_cli_embed_leaves_no_partial_output(tmp_path):
    from tpsurgery.cli import app

    folder = _saved_tiny(tmp_path)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS * 3), encoding="utf-8")
    (tmp_path / "r.yaml").write_text(json.dumps(REC), encoding="utf-8")
    out = tmp_path / "out" / "emb.npy"
    out.parent.mkdir()
    out.write_bytes(b"previous result")
    args = ["embed", "-i", str(tmp_path / "in.txt"), "-o", str(out), "-r", str(tmp_path / "r.yaml"),
            "-m", str(folder), "--batch-size", "4", "--no-progress"]
    calls = {"n": 0}

    def interrupt(module, args):  # a global hook: the CLI loads its own copy of the model
        if type(module).__name__ == "LlamaDecoderLayer":
            calls["n"] += 1
            if calls["n"] == 6:  # second batch, layer 1
                raise KeyboardInterrupt

    handle = torch.nn.modules.module.register_module_forward_pre_hook(observer(interrupt))
    try:
        result = CliRunner().invoke(app, args)
    finally:
        handle.remove()
    assert calls["n"] == 6 and result.exit_code != 0
    assert out.read_bytes() == b"previous result" and os.listdir(out.parent) == ["emb.npy"]
    result = CliRunner().invoke(app, args)  # uninterrupted: the whole array replaces the file
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (len(TEXTS) * 3, 32) and os.listdir(out.parent) == ["emb.npy"]


def test_a_write_that_fails_midway_leaves_the_old_output(tmp_path):
    """A real failure in the middle of writing (file-size limit: the kernel refuses the rest) keeps the old file."""
    resource = pytest.importorskip("resource")
    import signal

    from tpsurgery.cli import atomic_write_bytes

    out = tmp_path / "emb.npy"
    out.write_bytes(b"previous result")
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(OSError):
            atomic_write_bytes(out, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert out.read_bytes() == b"previous result" and os.listdir(tmp_path) == ["emb.npy"]


def test_ctrl_c_keeps_finished_batches_in_the_cache_and_cache_files_are_private(tmp_path):
    """Finished batches are stored as they finish (resume); an interrupted batch stores nothing; the rerun computes
    only the rest and equals an uninterrupted run bit for bit."""
    model, tok = tiny_model("llama")
    want = tpsurgery.apply(model, REC, tokenizer=tok, prefix_cache=False).encode(TEXTS, batch_size=2, max_tokens=10**6)
    old = os.umask(0)
    try:
        emb = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=tmp_path / "emb", prefix_cache=False)
    finally:
        os.umask(old)
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch of two: two have finished
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(observer(interrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            emb.encode(TEXTS, batch_size=2, max_tokens=10**6)
    finally:
        handle.remove()
    cache = emb.embedding_cache
    import sqlite3

    con = sqlite3.connect(cache.path)
    try:
        assert con.execute("SELECT COUNT(*) FROM emb2").fetchone() == (4,)  # two whole batches, nothing half-stored
    finally:
        con.close()
    calls["n"] = 0
    handle = model.model.layers[1].register_forward_pre_hook(observer(interrupt))  # counts the rerun's batches
    try:
        got = emb.encode(TEXTS, batch_size=2, max_tokens=10**6)
    finally:
        handle.remove()
    assert calls["n"] == 2 and cache.hits == 4 and np.array_equal(got, want)
    assert np.array_equal(emb.encode(TEXTS, batch_size=2), want) and cache.hits == 4 + len(TEXTS)
    for p in [tmp_path / "emb", *(tmp_path / "emb").rglob("*")]:
        assert not stat.S_IMODE(p.stat().st_mode) & (stat.S_IWOTH | stat.S_IWGRP), p


# ----------------------------------------------------------------------------------------------------- security
def test_import_fetches_nothing(tmp_path):
    code = (
        "import socket\n"
        "tried = []\n"
        "def guard(self, address, *a):\n"
        "    tried.append(address); raise OSError('network disabled in this test')\n"
        "socket.socket.connect = guard\n"
        "socket.socket.connect_ex = guard\n"
        "socket.create_connection = lambda address, *a, **k: guard(None, address)\n"
        "import tpsurgery, tpsurgery.cli, tpsurgery.embedder, tpsurgery.models, tpsurgery.backends.nnsight_backend\n"
        "from tpsurgery.cli import app\n"
        "print('attempts', len(tried))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TPSURGERY_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("attempts 0")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "hf").exists()  # importing writes no cache either


def test_remote_code_in_a_model_folder_is_never_run_by_default(tmp_path):
    folder = _saved_tiny(tmp_path)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM, LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        model, _ = tpsurgery.load_model(folder)
        assert type(model).__name__ == "LlamaForCausalLM"
    except tpsurgery.ModelError as exc:  # refusing is fine too, as long as nothing ran
        assert "trust_remote_code" in str(exc)
    assert not marker.exists()


def test_converted_weights_are_safetensors_and_not_world_writable(tmp_path, monkeypatch):
    from tpsurgery.models import write_converted

    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama")
    old = os.umask(0)  # the most permissive umask a user can have
    try:
        target = write_converted(model, tok, tmp_path / "cache" / "models" / "tiny")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*")]
    assert any(p.name == "model.safetensors" for p in files)
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    for p in [tmp_path / "cache", *files]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert not mode & (stat.S_IWOTH | stat.S_IWGRP), f"{p} has mode {oct(mode)}"
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["tiny"]  # no temporary folder left
    again, _ = tpsurgery.load_model(target)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_cache_anyone_can_write_to_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("TPSURGERY_CACHE", str(shared))
    (tmp_path / "planted.gguf").write_bytes(b"GGUF")
    with pytest.raises(tpsurgery.ModelError, match="writable by every user"):
        tpsurgery.load_model(tmp_path / "planted.gguf")
    assert os.listdir(shared) == []


def test_cli_reports_unreadable_input_as_one_error_line(tmp_path):
    from tpsurgery.cli import app

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name in ("missing.txt", "latin1.txt"):
        result = CliRunner().invoke(app, ["embed", "-i", str(tmp_path / name), "-o", str(tmp_path / "o.npy"),
                                          "-r", "smollm2-prompteol"])
        assert isinstance(result.exception, tpsurgery.InputError), result.exception
        assert str(result.exception).startswith(f"cannot read --input {tmp_path / name} as UTF-8 text")
    done = subprocess.run([sys.executable, "-m", "tpsurgery.cli", "embed", "-i", str(tmp_path / "missing.txt"),
                           "-o", str(tmp_path / "o.npy"), "-r", "smollm2-prompteol"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot read --input") and "Traceback" not in done.stderr
    assert not (tmp_path / "o.npy").exists()


def test_non_finite_embeddings_are_never_silent():
    model, tok = tiny_model("llama", dtype=torch.float16)
    emb = tpsurgery.apply(model, REC, tokenizer=tok)

    def overflow(module, args, output):  # the second row overflows float16, as a huge activation would
        out = output.clone()
        if out.shape[0] > 1:
            out[1] = out[1] * 1e9  # beyond float16 range: inf
        return out

    handle = model.model.layers[0].register_forward_hook(overflow)
    try:
        with pytest.warns(UserWarning, match=r"the embeddings of 1 input\(s\) are not finite or all zero \(NaN, inf, or an overflow in the final norm; inputs 2\)"):
            out = emb.encode(["a much longer first sentence", "a much longer first sentence", "mid one", "x"],
                             batch_size=4)
    finally:
        handle.remove()
    assert not np.isfinite(out[2]).all() and np.isfinite(out[[0, 1, 3]]).all()
