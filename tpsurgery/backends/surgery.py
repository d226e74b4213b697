"""The two row edits every backend applies, as pure tensor functions (no engine code).

>>> import torch
>>> from tpsurgery.plan import collate
>>> from tpsurgery.prompts import Encoded
>>> batch = collate([Encoded(ids=(5, 0, 6, 7), placeholders=(1,), text_span=(2, 3))], pad_id=9)
>>> plan = type("P", (), {"alpha": 1.0, "init_vector": torch.zeros(2)})()
>>> h = torch.arange(8.).reshape(1, 4, 2)
>>> overwrite_placeholders(h, plan, batch)[0].tolist()
[[0.0, 1.0], [6.0, 7.0], [4.0, 5.0], [6.0, 7.0]]
>>> write_initial(h, plan, batch)[0, 1].tolist(), h[0, 1].tolist()   # copies: the input is left alone
([0.0, 0.0], [2.0, 3.0])
"""

from __future__ import annotations

import torch

from ..plan import Batch, Plan


def overwrite_placeholders(h: torch.Tensor, plan: Plan, batch: Batch) -> torch.Tensor:
    """A copy of ``h`` ([B, L, d]) whose placeholder rows hold the source row (or the alpha mix)."""
    h = h.clone()
    rows = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    ph = batch.placeholders.to(h.device)
    src = h[rows[:, 0], batch.source.to(h.device)].unsqueeze(1).clone()
    if plan.alpha != 1.0:
        src = plan.alpha * src + (1.0 - plan.alpha) * h[rows, ph]
    h[rows, ph] = src.expand(-1, ph.shape[1], -1).to(h.dtype)
    return h


def write_initial(e: torch.Tensor, plan: Plan, batch: Batch) -> torch.Tensor:
    """A copy of the embedding output ``e`` whose placeholder rows hold the plan's initial vector."""
    e = e.clone()
    rows = torch.arange(e.shape[0], device=e.device).unsqueeze(1)
    e[rows, batch.placeholders.to(e.device)] = plan.init_vector.to(e.device, e.dtype)
    return e
