"""Issue 21.6: every family of the architecture table runs (tiny models of each, tpsurgery.testing.ARCHS); what the
table leaves open is probed on the model (tuple_output, the attention output projection), and a family it cannot
run says which ArchSpec field to register; the ``embed`` site is ``hidden_states[0]`` also where the model scales the
embedding before layer 0 (Granite's embedding_multiplier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpsurgery
from tpsurgery.arch import ARCHITECTURES, ArchSpec, arch_for
from tpsurgery.errors import ModelError
from tpsurgery.testing import ARCHS, PAD, BOS, EOS, VOCAB, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# the token-embedding output is hidden_states[0] except where positions are added after it (GPT-2's wpe, OPT's)
HS0_ARCHS = tuple(a for a in ARCHS if a not in ("gpt2", "opt"))
INIT = "prompt: '{text} : <PST> x'\nplaceholder: {init: ones}\npreprocess: false\npooling: mean\n"


def test_every_table_family_has_a_tiny_model():
    types = {tiny_model(a, n_layers=1)[0].config.model_type for a in ARCHS}
    assert set(ARCHITECTURES) <= types | {"gemma3_text"} and "gemma3_text" in types


def _hf_states(model, ids, placeholder=None):
    """HF's output_hidden_states, with hidden_states[0]'s placeholder row set to ones (a pre-hook on layer 0)."""
    layer0 = arch_layers(model)[0]

    def pre(mod, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, placeholder] = 1.0
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = layer0.register_forward_pre_hook(pre, with_kwargs=True) if placeholder is not None else None
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        if handle is not None:
            handle.remove()


def arch_layers(model):
    from tpsurgery.arch import get_path

    return get_path(model, arch_for(model).layers)


@pytest.mark.parametrize("arch", HS0_ARCHS)
def test_embed_site_and_exit_layer_0_are_hidden_states_0(arch):
    model, tok = tiny_model(arch, n_layers=2)
    emb = tpsurgery.apply(model, INIT + "exit_layer: 0", tokenizer=tok)
    row = emb.tokenize(["a b"], emb.recipe.templates[0])[0]
    (p,) = row.placeholders
    s, e = row.text_span
    plain = _hf_states(model, row.ids)
    first = plain[0].clone()
    first[0, p] = 1.0  # hidden_states[0] with the placeholder row written (Falcon records it before layer 0's hooks)
    edited = (first, *_hf_states(model, row.ids, placeholder=p)[1:])
    for fast in (True, False):
        emb.backend.fast_path = fast
        got = emb.encode(["a b"], all_layers=True)[0]
        assert np.allclose(got[0], plain[0][0, s:e].mean(0).numpy(), atol=1e-6)
    two = tpsurgery.apply(model, INIT.replace("pooling: mean", "pooling: last") + "exit_layer: 2", tokenizer=tok)
    for fast in (True, False):
        two.backend.fast_path = fast
        got = two.encode(["a b"], all_layers=True)[0]
        want = torch.stack([h[0, -1] for h in edited]).numpy()
        want[2] = _final(model, edited)  # hidden_states[n] is the final norm's output
        assert np.allclose(got, want, atol=1e-5), (arch, fast, np.abs(got - want).max(1))


def _final(model, states):
    return states[-1][0, -1].numpy()


def _mpt():
    import transformers as T

    cfg = T.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=512, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def mpt_registered():
    yield
    ARCHITECTURES.pop("mpt", None)


def test_a_registered_family_gets_tuple_output_and_attn_out_probed(mpt_registered):
    model = _mpt()  # MPT's blocks return tuples and name the projection attn.out_proj
    tpsurgery.register_architecture("mpt", ArchSpec("transformer.blocks", "transformer.wte", "transformer.norm_f"))
    spec = arch_for(model)
    assert (spec.tuple_output, spec.attn_out) == (True, "attn.out_proj")
    recipe = ("prompt: 'This sentence : <PST> {text} means'\ntp: {start: 1, stop: 2}\nexit_layer: 2\n"
              "edits: [{site: attn_out_in, layers: 1, heads: [1], rows: last, op: scale, factor: 0.0}]")
    emb = tpsurgery.apply(model, recipe, tokenizer=tiny_tokenizer())
    fast = emb.encode(["a b", "c"])
    emb.backend.fast_path = False
    assert np.allclose(fast, emb.encode(["a b", "c"]), atol=1e-6)


def test_a_wrong_tuple_output_names_the_field_and_register_architecture(mpt_registered):
    model = _mpt()
    tpsurgery.register_architecture("mpt", ArchSpec("transformer.blocks", "transformer.wte", "transformer.norm_f",
                                                    tuple_output=False))
    with pytest.raises(ModelError, match=r"tuple_output=False.*returns a tuple.*register_architecture\('mpt'"):
        tpsurgery.apply(model, "prompt: '<PST> {text}'", tokenizer=tiny_tokenizer())


def test_an_unknown_model_type_is_probed_not_copied_from_a_look_alike_row():
    model, tok = tiny_model("falcon", n_layers=2)
    model.config.model_type = "my_falcon"  # not in the table: the falcon row's paths fit, its details are probed
    spec = arch_for(model)
    assert spec.tuple_output is True and spec.attn_out == "self_attention.dense"
    llama, _ = tiny_model("llama", n_layers=2)
    llama.config.model_type = "my_llama"
    assert arch_for(llama).tuple_output is False


def test_a_layer_that_returns_neither_is_a_clear_error():
    model, tok = tiny_model("llama", n_layers=2)
    model.config.model_type = "odd"
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: {"h": out})
    try:
        with pytest.raises(ModelError, match="neither the hidden state.*tuple_output.*register_architecture"):
            arch_for(model)
    finally:
        handle.remove()
