"""The edit ops as pure tensor functions, shared by every backend (no engine code here).

A backend calls :func:`apply_edits` at each hook point with the edits of that site and layer; the result is a new
tensor (the input is left alone).

>>> import torch
>>> from tpsurgery.edits import Edit, Vector
>>> from tpsurgery.plan import collate
>>> from tpsurgery.prompts import Encoded
>>> batch = collate([Encoded(ids=(5, 0, 6, 7), placeholders=(1,), text_span=(2, 3))], pad_id=9)
>>> h = torch.arange(8.).reshape(1, 4, 2)
>>> apply_edits(h, [Edit("layer_in", 1, "copy", source=-1)], batch)[0].tolist()     # Token Prepending
[[0.0, 1.0], [6.0, 7.0], [4.0, 5.0], [6.0, 7.0]]
>>> apply_edits(h, [Edit("embed", 0, "write", vector=Vector(torch.zeros(2)))], batch)[0, 1].tolist(), h[0, 1].tolist()
([0.0, 0.0], [2.0, 3.0])
>>> other = {("aux", "layer_in", 1, "last"): torch.ones(1, 1, 2)}     # rows captured from another prompt's run
>>> edits = [Edit("layer_in", 1, "subtract", rows="last", run="aux"), Edit("layer_in", 1, "scale", rows="last", factor=2.0)]
>>> apply_edits(h, edits, batch, other)[0, -1].tolist()
[10.0, 12.0]
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..edits import Edit, Rows
from ..errors import BackendError
from ..plan import Batch

Captured = Mapping[tuple, torch.Tensor]  # (run, site, layer, rows) -> [B, k, width] rows of an auxiliary run


def row_index(rows: Rows, batch: Batch, width: int, device: torch.device) -> torch.Tensor:
    """``[B, k]`` column indices of ``rows`` in a left-padded batch of ``width`` columns."""
    if rows == "placeholders":
        return batch.placeholders.to(device)
    col = width - 1 if rows == "last" else width + rows
    return torch.full((batch.size, 1), col, dtype=torch.long, device=device)


def _columns(e: Edit, width: int, n_heads: int | None) -> slice | torch.Tensor:
    """The columns an edit changes: every column, or those of ``e.heads`` (o_proj input: head-major)."""
    if e.heads is None:
        return slice(None)
    if not n_heads or width % n_heads:
        raise BackendError(f"recipe field `{e.field}`: cannot split a width of {width} into {n_heads} heads", e.layer)
    hd = width // n_heads
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in e.heads])


def capture(h: torch.Tensor, rows: Rows, batch: Batch) -> torch.Tensor:
    """``[B, k, width]``: the rows of ``h`` an ``add`` / ``subtract`` edit of another run reads (a copy)."""
    ar = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    return h[ar, row_index(rows, batch, h.shape[1], h.device)].clone()


def _new_rows(e: Edit, h: torch.Tensor, cur: torch.Tensor, orig: torch.Tensor, ar: torch.Tensor, batch: Batch,
              captured: Captured, cols: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """The edited rows ``[B, k, w]`` from the current rows ``cur`` (``orig``: before this site's first edit);
    ``h``, ``cur``, ``orig`` hold the edited columns ``cols`` only."""
    if e.op == "write":
        v = e.vector.tensor
        v = v[cols.cpu()] if not isinstance(cols, slice) else v
        if v.numel() != cur.shape[-1]:
            raise BackendError(f"recipe field `{e.field}`: a vector of {e.vector.tensor.numel()} values for rows "
                               f"whose edited part is {cur.shape[-1]} wide", e.layer)
        return v.to(cur.device, cur.dtype).expand_as(cur)
    if e.op == "copy":
        src = h[ar[:, 0], h.shape[1] + e.source].unsqueeze(1).clone()
        if e.alpha != 1.0:
            src = e.alpha * src + (1.0 - e.alpha) * cur
        return src.expand(-1, cur.shape[1], -1).to(cur.dtype)
    if e.op in ("add", "subtract"):
        other = captured.get((e.run, e.site, e.layer, e.rows))
        if other is None:
            raise BackendError(f"recipe field `{e.field}`: run {e.run!r} provided no rows at this site", e.layer)
        other = other.to(cur.device, cur.dtype)[..., cols]
        if other.shape != cur.shape:
            raise BackendError(f"recipe field `{e.field}`: run {e.run!r} gave rows of shape {tuple(other.shape)} "
                               f"for rows of shape {tuple(cur.shape)}", e.layer)
        return cur + other if e.op == "add" else cur - other
    if e.op == "scale":
        return cur * e.factor
    if e.op == "recover_norm":
        return cur * (orig.norm(dim=-1, keepdim=True) / (cur.norm(dim=-1, keepdim=True) + e.eps))
    raise BackendError(f"recipe field `{e.field}`: op {e.op!r} is not a row op", e.layer)


def apply_edits(h: torch.Tensor, edits: Sequence[Edit], batch: Batch, captured: Captured | None = None,
                n_heads: int | None = None) -> torch.Tensor:
    """A copy of ``h`` ([B, L, w]) with ``edits`` (one site of one layer) applied in order."""
    out = h.clone()
    if not edits:
        return out
    ar = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    for e in edits:
        if e.rows == "placeholders" and batch.placeholders.shape[1] == 0:
            continue  # a template without placeholders: nothing to edit
        idx = row_index(e.rows, batch, h.shape[1], h.device)
        cols = _columns(e, h.shape[-1], n_heads)
        cur = out[ar, idx]
        orig = h[ar, idx]
        if isinstance(cols, slice):
            out[ar, idx] = _new_rows(e, out, cur, orig, ar, batch, captured or {})
        else:
            cols = cols.to(h.device)
            sub = _new_rows(e, out[..., cols], cur[..., cols], orig[..., cols], ar, batch, captured or {}, cols)
            cur[..., cols] = sub
            out[ar, idx] = cur
    return out
