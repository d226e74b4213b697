"""Failing examples the property suite (tests/test_prop_*.py) found, kept as explicit regression tests."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tpsurgery
from prop_support import model_for


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_official_compat_truncates_long_sentences(arch):
    """compat=official used to skip truncation: GPT-2/OPT (learned positions) crashed with a BackendError
    (IndexError) past 512 tokens and RoPE models silently ran past their limit. Found by
    test_identity_without_tp_equals_hf_hidden_states (template '{text}', text '0' * 600)."""
    model, tok = model_for(arch)
    official = tpsurgery.apply(model, {"prompt": "{text}", "compat": "official"}, tokenizer=tok)
    exact = tpsurgery.apply(model, {"prompt": "{text}", "compat": "exact"}, tokenizer=tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = official.encode("0" * 600)
    assert any("truncated" in str(w.message) for w in caught)
    row = official.tokenize(["0" * 600], "{text}")[0]
    assert len(row.ids) == 512 and row.truncated
    # without markers both modes are the same token sequence, so the same embedding
    np.testing.assert_array_equal(got, exact.encode("0" * 600))
