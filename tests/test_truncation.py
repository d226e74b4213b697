"""Truncation to ``max_length`` (issue 23 item 12): the cut is found from the whole text's token offsets with O(1)
tokenizer calls, and it is bit for bit the cut of the plain binary search it replaced (the oracle below), so the
embeddings of truncated texts do not change.

The oracle uses only the public ``encode_prompts`` without a limit: the binary search over character prefixes of the
(preprocessed, character-bounded) sentence for the longest one whose prompt fits, as the code before this change did.
Tokenizers: the tiny byte tokenizer (no merges: the token count grows with every character) and two trained on a
small corpus here (byte-level BPE like GPT-2 / SmolLM2, and a SentencePiece-like Unigram with a normalizer): their
merges make the count go up and down inside a word, so fitting is not monotone near the cut.
"""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tpsurgery.errors import InputError
from tpsurgery.prompts import Encoded, char_bound, encode_prompts, preprocess_sentence
from tpsurgery.testing import tiny_tokenizer

PH = 7  # any id: the placeholder token
WORDS = ("the", "a", "man", "woman", "is", "playing", "guitar", "tokenization", "quickly", "sentence", "meaning",
         "over", "under", "running", "dog", "cats", "42", "2026", "rewritten", "é", "naïve", "über")
TEMPLATES = (
    'This sentence : <PST> "{text}" means in one word:"',
    "{text}",
    "{text}{text}",  # two slots, nothing between them: the cut shrinks both
    "Rewrite the following sentence: {text}\nThe rewritten sentence: {text}",  # the shipped echo recipe
    "Echo <PST> {text} and again: <PST>{text} ok",  # two slots in two official chunks
    "<PST>{text}",
)


@functools.lru_cache(maxsize=None)
def trained(kind: str):
    """A real fast tokenizer trained here on a seeded corpus of WORDS (seconds; no download)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + rng.choice(".?!") for _ in range(400)]
    if kind == "bpe":  # GPT-2 style: byte-level pre-tokenizer, merges
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "<s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece style: a normalizer, metaspace, unigram
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "<s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")


def tokenizer(name: str):
    return tiny_tokenizer(bos=name == "bytes+bos") if name.startswith("bytes") else trained(name)


def oracle(tok, template, texts, max_length, compat, preprocess):
    """The rows, or the InputError, of the old code: binary search over prefixes of each sentence."""
    out = []
    for i, text in enumerate(texts):
        text = preprocess_sentence(text) if preprocess else text
        text = text[: char_bound(tok, max_length)]

        def enc(t):
            return encode_prompts(tok, template, [t], PH, preprocess=False, compat=compat)[0]

        whole = enc(text)
        if len(whole.ids) <= max_length:
            out.append(whole)
            continue
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(enc(text[:mid]).ids) <= max_length:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise InputError(i, f"the prompt alone is longer than the model's limit of {max_length} tokens")
        e = enc(text[:lo])
        out.append(Encoded(e.ids, e.placeholders, e.text_span, truncated=True))
    return out


def outcome(f, *args):
    try:
        return f(*args)
    except InputError as e:
        return ("InputError", e.index, str(e))


def new(tok, template, texts, max_length, compat, preprocess):
    return encode_prompts(tok, template, texts, PH, preprocess=preprocess, max_length=max_length, compat=compat,
                          warn=False)


texts_st = st.lists(st.one_of(
    st.lists(st.sampled_from(WORDS + (".", ",", "?", '"', "0", "😀", "  ")), min_size=5, max_size=120).map(" ".join),
    st.lists(st.sampled_from(WORDS + ("1", "x", "é")), min_size=5, max_size=60).map("".join),  # one long word
    st.text(max_size=300),
), min_size=1, max_size=3)


def check_same(tok, room, texts, template, compat, preprocess):
    max_length = len(encode_prompts(tok, template, [""], PH, preprocess=False, compat=compat)[0].ids) + room
    got = outcome(new, tok, template, texts, max_length, compat, preprocess)
    assert got == outcome(oracle, tok, template, texts, max_length, compat, preprocess)
    return "error" if isinstance(got, tuple) else "truncated" if any(e.truncated for e in got) else "fits"


@given(name=st.sampled_from(["bytes", "bytes+bos", "bpe", "unigram"]), texts=texts_st, room=st.integers(0, 40),
       template=st.sampled_from(TEMPLATES), compat=st.sampled_from(["exact", "official"]), preprocess=st.booleans())
def test_truncation_is_the_binary_search_result(name, texts, room, template, compat, preprocess):
    event(check_same(tokenizer(name), room, texts, template, compat, preprocess))


@pytest.mark.parametrize("compat", ["exact", "official"])
@pytest.mark.parametrize("name", ["bytes+bos", "bpe", "unigram"])
def test_two_text_slots_with_one_long_sentence(name, compat):
    """tests/test_regressions_found.py::test_truncation_with_two_text_slots: both slots shrink with the cut."""
    for text in ("0" * 600, "é" * 300, "tokenization" * 60):
        assert check_same(tokenizer(name), 100, [text], "{text}{text}", compat, False) == "truncated"


@pytest.mark.slow
@settings(max_examples=50)
@given(texts=texts_st, room=st.integers(0, 40), template=st.sampled_from(TEMPLATES),
       compat=st.sampled_from(["exact", "official"]), preprocess=st.booleans())
def test_truncation_is_the_binary_search_result_on_smollm2(smollm2, texts, room, template, compat, preprocess):
    event(check_same(smollm2[1], room, texts, template, compat, preprocess))


class Counting:
    """The real tokenizer, counting its calls and the strings it tokenized."""

    def __init__(self, tok):
        self.tok, self.calls, self.strings = tok, 0, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, strings, **kwargs):
        self.calls += 1
        self.strings += len(strings)
        return self.tok(strings, **kwargs)


@pytest.mark.parametrize("template", [TEMPLATES[0], TEMPLATES[3]])
@pytest.mark.parametrize("compat", ["exact", "official"])
@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_one_long_text_costs_a_few_tokenizer_calls(name, compat, template):
    """The binary search called the tokenizer ~log2(characters) + 2 times (13-15 here; 26-28 in compat=official with
    a <PST>: one call per chunk; this test fails on that code); now: the whole text once, then one batch of the cuts
    it would probe near the cut guessed from the whole text's token offsets (with two {text} slots, both shrink)."""
    tok = Counting(tokenizer(name))
    text = " ".join(random.Random(1).choice(WORDS) for _ in range(20_000))
    (row,) = new(tok, template, [text], 512, compat, True)
    assert row.truncated and len(row.ids) <= 512
    assert tok.calls <= 3, (tok.calls, tok.strings)  # official with a <PST>: + the chunk before it, once
    assert tok.strings <= 12, (tok.calls, tok.strings)
    assert [row] == oracle(tokenizer(name), template, [text], 512, compat, True)
