"""Pooling shared by every backend: :func:`pool` makes one read ``[B, d]`` of ``hidden_states[j]`` (a function of the
whole batch), :func:`combine` makes the embedding of the reads of ``plan.read_layers``.

>>> import torch
>>> from tpsurgery.batch import collate
>>> from tpsurgery.prompts import Encoded
>>> batch = collate([Encoded(ids=(5, 6, 7), placeholders=(), text_span=(1, 3))], pad_id=0)
>>> h = torch.arange(12.).reshape(1, 3, 4)
>>> pool(h, "last", batch).tolist(), pool(h, "mean", batch).tolist()
([[8.0, 9.0, 10.0, 11.0]], [[6.0, 7.0, 8.0, 9.0]])
>>> combine([torch.zeros(1, 2), torch.ones(1, 2)], "mean").tolist()
[[0.5, 0.5]]
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..batch import Batch
from ..plan import Plan

POOLINGS = ("last", "mean", "last_k")


def pool(hidden: Float[Tensor, "b l d"], plan_or_pooling: Plan | str, batch: Batch) -> Float[Tensor, "b d"]:
    """One read, float32: ``last`` the last column (batches are left-padded); ``mean`` the mean over the sentence
    tokens (``batch.text_mask``); ``last_k`` the mean of the last ``plan.pool_k`` columns."""
    if isinstance(plan_or_pooling, str):
        pooling, k = plan_or_pooling, 1
    else:
        pooling, k = plan_or_pooling.pooling, plan_or_pooling.pool_k
    if pooling == "last":
        return hidden[:, -1].float()
    if pooling == "last_k":
        return hidden[:, -k:].float().mean(1)
    w = batch.text_mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1.0)


def combine(reads: Sequence[Float[Tensor, "b d"]], plan_or_weights: Plan | str | Sequence[float] | None) \
        -> Float[Tensor, "b d"]:
    """The embedding from the reads of ``plan.read_layers`` in that order: the read itself for one layer, else the
    mean, or the weighted sum with ``plan.read_weights`` (a plan, a weight list, or ``"mean"`` / None)."""
    if len(reads) == 1:
        return reads[0]
    weights = plan_or_weights.read_weights if isinstance(plan_or_weights, Plan) else plan_or_weights
    if weights is None or isinstance(weights, str):
        return torch.stack(list(reads)).mean(0)
    if len(weights) != len(reads):
        raise ValueError(f"{len(weights)} weights for {len(reads)} reads")
    return sum(w * r for w, r in zip(weights, reads))
