"""Pooling shared by every backend.

>>> import torch
>>> h = torch.arange(12.).reshape(1, 3, 4); m = torch.tensor([[0., 1., 1.]])
>>> pool(h, "last", m).tolist(), pool(h, "mean", m).tolist()
([[8.0, 9.0, 10.0, 11.0]], [[6.0, 7.0, 8.0, 9.0]])
"""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, pooling: str, text_mask: torch.Tensor) -> torch.Tensor:
    """``last``: the last column (batches are left-padded); ``mean``: mean over ``text_mask``. Returns float32."""
    if pooling == "last":
        return hidden[:, -1].float()
    w = text_mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1.0)
