"""The run-time shape checks are on: a tensor of the wrong shape handed to an annotated function fails in the suite
(tests/conftest.py installs jaxtyping's import hook with beartype on the modules it lists)."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from tpsurgery.backends.walk import Point, Walk
from tpsurgery.plan import Plan, collate
from tpsurgery.prompts import Encoded


def test_a_wrong_shape_fails_at_the_call():
    batch = collate([Encoded(ids=(5, 0, 6), placeholders=(1,), text_span=(2, 3))], pad_id=9)
    walk = Walk(Plan(4, 4, (), "last", 0), batch)
    assert walk.at(Point(0, "layer_in", ()), torch.zeros(1, 3, 2)).shape == (1, 3, 2)
    with pytest.raises(TypeCheckError):
        walk.at(Point(0, "layer_in", ()), torch.zeros(2, 3))  # [B, L] where [B, L, W] is declared
