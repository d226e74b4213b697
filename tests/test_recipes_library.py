"""The shipped recipe library: every recipe validates, runs on tiny random decoders of several families, equals a
plain-hook reference, and each field it relies on visibly does its job.

Paper recipes state TP layers absolutely (LLaMA2-7B, 32 layers) and exit layers from the end: a 14-layer tiny model
(hidden 16) keeps every TP layer of [1, 8) before hidden_states[-6]; the resume-at-R recipes run on 32 layers.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import yaml

import tpsurgery
from tpsurgery.library import RECIPE_DIR, find_recipe, list_recipes, load_recipe
from tpsurgery.prompts import preprocess_sentence
from tpsurgery.recipe import dump_recipe, parse_recipe
from tpsurgery.testing import tiny_model

from recipe_oracle import decoder_layers, oracle_embed
from tpsurgery.foreign import observer

NAMES = [name for name, _ in list_recipes()]
ARCHS = ("llama", "qwen2", "gemma3", "gpt2", "gemma2", "phi3", "gpt_neox", "mistral")
TEXTS = ['A man is playing a guitar "loudly"', "Is it raining?"]


def tp_layers(plan) -> tuple[int, ...]:
    """The layers whose placeholder rows TP overwrites, read off the plan's edit list."""
    return tuple(e.layer for e in plan.at("layer_in") if e.op == "copy" and e.rows == "placeholders")


def init_row(plan):
    """The placeholders' initial embedding-output row (None: the carrier token's own row), off the edit list."""
    return next((e.vector.tensor for e in plan.at("embed") if e.op == "write"), None)


@functools.lru_cache(maxsize=None)
def deep(arch: str, bos: bool = False, depth: int = 14):
    """A tiny random decoder (hidden 16) deep enough for the paper's layer numbers, shared by the module."""
    return tiny_model(arch, n_layers=depth, hidden=16, seed=3, bos=bos)


def depth_for(recipe) -> int:
    """14 layers hold TP [1, 8) before hidden_states[-6]; resuming at R needs R < 32 - 5 (LLaMA2-7B's depth)."""
    return 32 if recipe.tp.resume is not None else 14


def embedder(name: str, arch: str = "llama", **changes):
    recipe = load_recipe(name)
    hf, tok = deep(arch, depth=depth_for(recipe))
    return tpsurgery.apply(hf, recipe.replace(**changes) if changes else recipe, tokenizer=tok)


def close(a, b, tol=1e-4):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ----------------------------------------------------------------------------------------------- the library
def test_library_covers_the_paper_tables():
    wanted = {
        "table 1": ["avg", "avg-tp", "echo", "echo-tp", "prompteol", "prompteol-tp", "metaeol", "metaeol-tp", "cot",
                    "cot-tp", "knowledge", "knowledge-tp"],
        "table 3": ["prompteol-tp-pos-start", "prompteol-tp-pos-in-quote", "prompteol-tp-pos-after-text",
                    "cot-tp-pos-before-this", "cot-tp-pos-in-quote", "cot-tp-pos-after-text"],
        "table 4": [f"cot-tp-init-{k}" for k in ("zeros", "ones", "uniform", "gaussian", "space")],
        "table 6": ["cot-bidir-last-token", "cot-bidir-sentence"],
        "table 13": ["prompt-a", "prompt-a-tp", "prompt-b", "prompt-b-tp", "prompt-c-tp", "prompt-d-tp"],
        "table 14": ["prompteol-tp-2pst", "prompteol-tp-3pst", "prompteol-tp-4pst"],
        "table 15": ["prompteol-tp-mask-first-layer"],
        "table 16": [f"prompteol-tp-resume-{r}" for r in (9, 10, 11, 16, 26)],
        "table 17": ["no-prompt", "no-prompt-tp"],
        "official": ["prompteol-tp-official"],
    }
    missing = {t: [n for n in names if n not in NAMES] for t, names in wanted.items()}
    assert not any(missing.values()), missing


@pytest.mark.parametrize("name", NAMES)
def test_recipe_file_validates_names_itself_and_round_trips(name):
    path = find_recipe(name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe = parse_recipe(raw, base=path.parent)  # vector files lie next to the recipe
    assert recipe.name == name == path.stem
    assert recipe.description and "\n" not in recipe.description.strip()
    assert parse_recipe(dump_recipe(recipe)) == recipe
    assert set(raw) <= set(recipe.model_fields)


def test_recipes_list_prints_every_recipe_with_its_description():
    from typer.testing import CliRunner

    from tpsurgery.cli import app

    result = CliRunner().invoke(app, ["recipes", "list"])
    assert result.exit_code == 0, result.output
    for name, desc in list_recipes():
        assert any(line.split()[:1] == [name] and desc[:30] in line for line in result.output.splitlines()), name
    assert len(list_recipes()) == len(list(RECIPE_DIR.glob("*.yaml")))


# ------------------------------------------------------------------------------ every recipe runs == oracle
@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_and_equals_the_hook_oracle(name):
    recipe = load_recipe(name)
    if recipe.edits:
        pytest.skip("an `edits` section: checked against the edit-list and CP oracles (test_prop_edits.py, test_cp.py)")
    # spread the library over the families; the 32-layer resume recipes share one Llama
    arch = "llama" if recipe.tp.resume is not None else ARCHS[NAMES.index(name) % len(ARCHS)]
    emb = embedder(name, arch)
    got = emb.encode(TEXTS, batch_size=2)
    assert got.shape == (2, 16) and np.isfinite(got).all()
    texts = TEXTS if len(emb.recipe.templates) == 1 else TEXTS[1:]  # MetaEOL: 8 long prompts, one text suffices
    assert close(got[: len(texts)] if len(texts) == 2 else got[1:], oracle_embed(emb, texts)), (name, arch)
    assert emb.explain(TEXTS[0])


# ------------------------------------------------------------------------------------- field behaviour pins
def test_resume_equals_stop_then_restart_computed_by_hand():
    emb = embedder("prompteol-tp-resume-16")
    assert emb.plan.exit_layer == 27
    by_hand = [1, 2, 3, 4, 5, 6, 7] + list(range(16, 27))  # TP [1, 8), pause, resume at 16 up to the exit
    assert list(tp_layers(emb.plan)) == by_hand
    got = emb.encode(TEXTS)
    assert close(got, oracle_embed(emb, TEXTS, tp_layers=by_hand))
    no_resume = embedder("prompteol-tp-resume-16", tp={"start": 1, "stop": 8})  # same 32-layer model
    assert not close(got, no_resume.encode(TEXTS))  # resuming changes the embedding
    late = embedder("prompteol-tp-resume-26")
    assert list(tp_layers(late.plan)) == [1, 2, 3, 4, 5, 6, 7, 26]  # layer 26 is the last one before hidden_states[27]


def test_metaeol_is_the_mean_of_its_single_prompt_runs():
    assert len(load_recipe("metaeol-tp").templates) == 8
    three = load_recipe("metaeol-tp").templates[:3]  # the same code path as eight, at 3/8 of the cost
    emb = embedder("metaeol-tp", "qwen2", prompt=list(three))
    singles = [embedder("metaeol-tp", "qwen2", prompt=t).encode(TEXTS) for t in three]
    assert close(emb.encode(TEXTS), np.mean(singles, 0), tol=1e-5)
    assert not close(singles[0], singles[1])


def test_echo_mean_pools_the_second_copy():
    hf, tok = deep("llama", bos=True)
    emb = tpsurgery.apply(hf, load_recipe("echo"), tokenizer=tok)
    s = TEXTS[0]  # preprocess: false, so the sentence is used as is
    prefix = "Rewrite the following sentence: " + s + "\nThe rewritten sentence: "
    ids = tok(prefix + s)["input_ids"]  # byte tokenizer: one token per byte, after <bos>
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    second = slice(1 + len(prefix.encode()), len(ids))
    assert close(emb.encode(s), hs[second].mean(0))
    assert not close(emb.encode(s), hs[1:1 + len(s.encode())].mean(0))  # not the first copy


def test_avg_is_the_mean_over_the_sentence_tokens_without_bos():
    hf, tok = deep("llama", bos=True)
    emb = tpsurgery.apply(hf, load_recipe("avg"), tokenizer=tok)
    ids = tok(TEXTS[1])["input_ids"]
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert close(emb.encode(TEXTS[1]), hs[1:].mean(0))


@pytest.mark.parametrize("name, where", [
    ("prompteol-tp", 'This sentence : |"'), ("prompteol-tp-pos-start", '|This sentence'),
    ("prompteol-tp-pos-in-quote", ': "|A man'), ("prompteol-tp-pos-after-text", '\'loudly\'" |means'),
    ("cot-tp-pos-before-this", 'step , |this'), ("prompt-c-tp", "keyword |, this"),
])
def test_placeholder_lands_where_the_marker_stands(name, where):
    emb = embedder(name)
    row = emb.tokenize(TEXTS[:1], emb.recipe.templates[0])[0]
    (p,) = row.placeholders
    before, after = where.split("|")
    ids = list(row.ids)
    assert bytes(ids[:p]).decode().endswith(before) and bytes(ids[p + 1:]).decode().startswith(after)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_each_of_several_placeholders_receives_the_source_row(k):
    emb = embedder(f"prompteol-tp-{k}pst")
    row = emb.tokenize(TEXTS[:1], emb.recipe.templates[0])[0]
    assert len(row.placeholders) == k and list(row.placeholders) == list(range(row.placeholders[0],
                                                                             row.placeholders[0] + k))
    seen = []
    norm = decoder_layers(emb.model)[3].input_layernorm  # first thing layer 3 does with its (edited) input
    h = norm.register_forward_pre_hook(observer(lambda m, args: seen.append(args[0].detach().clone())))
    try:
        emb.encode(TEXTS[0])
    finally:
        h.remove()
    x = seen[-1][0]  # the last call holds the placeholders (a cached prompt prefix may run first, on its own)
    offset = len(row.ids) - x.shape[0]
    for p in row.placeholders:
        assert torch.equal(x[p - offset], x[-1])


def test_initialisations_use_their_own_rows():
    rows = {}
    for init in ("zeros", "ones", "uniform", "gaussian", "space"):
        emb = embedder(f"cot-tp-init-{init}")
        rows[init] = emb.encode(TEXTS)
        vec = init_row(emb.plan)
        if init == "space":
            assert vec is None and emb.placeholder_id == ord(" ")  # the byte tokenizer's space token
        else:
            assert vec is not None and vec.shape == (16,)
    assert float(init_row(embedder("cot-tp-init-zeros").plan).abs().max()) == 0.0
    assert float(init_row(embedder("cot-tp-init-ones").plan).min()) == 1.0
    u = init_row(embedder("cot-tp-init-uniform").plan)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not close(rows[a], rows[b], tol=1e-6), (a, b)


def test_official_compat_adds_the_lone_space_token_and_draws_a_standard_normal_row():
    exact, official = embedder("prompteol-tp"), embedder("prompteol-tp-official")
    e = exact.tokenize(TEXTS[:1], exact.recipe.templates[0])[0]
    o = official.tokenize(TEXTS[:1], official.recipe.templates[0])[0]
    assert len(o.ids) == len(e.ids) + 1
    p = o.placeholders[0]
    assert o.ids[p + 1] == ord(" ") and list(o.ids[:p]) == list(e.ids[:p])
    want = torch.randn(16, generator=torch.Generator().manual_seed(3407))
    assert torch.equal(init_row(official.plan), want)


def test_no_prompt_recipes_embed_the_bare_preprocessed_sentence():
    plain, tp = embedder("no-prompt"), embedder("no-prompt-tp")
    row = plain.tokenize(["Is it raining?"], plain.recipe.templates[0])[0]
    assert bytes(row.ids).decode() == "Is it raining."
    row_tp = tp.tokenize(["Is it raining?"], tp.recipe.templates[0])[0]
    assert row_tp.placeholders == (0,) and bytes(row_tp.ids[1:]).decode() == "Is it raining."
    assert not close(plain.encode(TEXTS), tp.encode(TEXTS))


def test_bidirectional_recipes_edit_every_layer_up_to_the_exit_and_no_tp():
    for name, mode in (("cot-bidir-last-token", "last_token"), ("cot-bidir-sentence", "sentence")):
        plan = embedder(name).plan
        assert {e.mode for e in plan.at("attn_mask")} == {mode} and tp_layers(plan) == ()
        assert tuple(e.layer for e in plan.at("attn_mask")) == tuple(range(plan.exit_layer))
        assert not close(embedder(name).encode(TEXTS), embedder("cot").encode(TEXTS))


def test_paper_recipes_on_a_shallow_model_name_the_field_that_does_not_fit():
    hf, tok = tiny_model("llama", n_layers=6, hidden=16)  # hidden_states[-6] exists, layer 7 does not
    with pytest.raises(tpsurgery.RecipeError, match="tp.spans.0"):
        tpsurgery.apply(hf, load_recipe("prompteol-tp"), tokenizer=tok)
    with pytest.raises(tpsurgery.RecipeError, match="tp.resume"):
        tpsurgery.apply(hf, load_recipe("prompteol-tp-resume-9").replace(tp={"start": 1, "stop": 2, "resume": 9}),
                        tokenizer=tok)


def test_official_compat_equals_the_reference_codes_tokenization_on_smollm2(smollm2):
    """The reference adds <PST> to the tokenizer and tokenizes the filled template in one call (evaluate.py)."""
    import copy

    _, tok = smollm2
    ref_tok = copy.deepcopy(tok)
    ref_tok.add_tokens(["<PST>"])
    pst = ref_tok.convert_tokens_to_ids("<PST>")
    by_template = {load_recipe(n).templates: n for n in NAMES if load_recipe(n).tp.spans}  # one recipe per prompt
    names = sorted(by_template.values())
    sentences = ["A man is playing a guitar.", "  Two  dogs run!", 'She said "hi"?']
    for name in names:
        recipe = load_recipe(name).replace(compat="official")
        emb = tpsurgery.apply(smollm2[0], recipe, tokenizer=tok)
        for template in recipe.templates:
            rows = emb.tokenize(sentences, template)
            for s, row in zip(sentences, rows):
                text = preprocess_sentence(s) if recipe.preprocessing else s
                filled = template.replace("{text}", text).strip()
                want = [emb.placeholder_id if i == pst else i for i in ref_tok(filled)["input_ids"]]
                assert list(row.ids) == want, (name, s)
