"""The run-time shape checks are on: a tensor of the wrong shape handed to an annotated function fails in the suite
(tests/conftest.py installs jaxtyping's import hook with beartype on the modules it lists)."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from tpsurgery.backends.walk import Point, Walk
from tpsurgery.batch import collate
from tpsurgery.plan import Plan
from tpsurgery.prompts import Encoded


def test_a_wrong_shape_fails_at_the_call():
    batch = collate([Encoded(ids=(5, 0, 6), placeholders=(1,), text_span=(2, 3))], pad_id=9)
    walk = Walk(Plan(4, 4, (), "last", 0), batch)
    assert walk.at(Point(0, "layer_in", ()), torch.zeros(1, 3, 2)).shape == (1, 3, 2)
    with pytest.raises(TypeCheckError):
        walk.at(Point(0, "layer_in", ()), torch.zeros(2, 3))  # [B, L] where [B, L, W] is declared


def test_a_batch_with_mismatched_fields_fails_at_construction():
    """Batch's fields share the dimensions b (rows) and l (columns): a text mask of another width is refused."""
    from tpsurgery.batch import Batch

    good = collate([Encoded(ids=(5, 0, 6), placeholders=(1,), text_span=(2, 3))], pad_id=9)
    fields = dict(good.__dict__)
    assert Batch(**fields).size == 1
    with pytest.raises(TypeCheckError):
        Batch(**{**fields, "text_mask": torch.zeros(1, 4)})
