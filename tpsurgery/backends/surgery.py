"""Applying edits to a site's tensor, shared by every backend (no engine code here): row selection, head split, and
each op's own tensor function from the registry (:data:`tpsurgery.ops.OPS`).

A backend calls :func:`apply_edits` at each hook point with the edits of that site and layer; the result is a new
tensor (the input is left alone). An edit's result is kept on its rows (:func:`row_mask`) and heads only.

>>> import torch
>>> from tpsurgery.edits import Edit, Vector
>>> from tpsurgery.batch import collate
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
>>> apply_edits(h, [Edit("layer_in", 1, "add", rows="all", vector=Vector(torch.ones(2)))], batch)[0, 0].tolist()
[1.0, 2.0]
>>> apply_edits(h, [Edit("attn_out_in", 1, "scale", rows="all", factor=0.0, heads=(1,))], batch, n_heads=2)[0].tolist()
[[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [6.0, 0.0]]
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..edits import Edit, Rows
from ..errors import BackendError
from ..ops import OPS
from ..batch import Batch

Captured = Mapping[tuple, torch.Tensor]  # (run, site, layer, rows) -> [B, k, width] rows of an auxiliary run


def _starts(batch: Batch, device: torch.device) -> Int[Tensor, "b"]:
    """Each row's first column (left padding)."""
    if batch.starts is not None:
        return batch.starts.to(device)
    return (batch.attention_mask.cumsum(1) == 0).sum(1).to(device)


def row_index(rows: Rows, batch: Batch, width: int, device: torch.device) -> Int[Tensor, "b k"]:
    """``[B, k]`` column indices of ``rows`` (a selector with the same number of rows in every sequence:
    placeholders, last, positions) in a left-padded batch of ``width`` columns."""
    if rows == "placeholders":
        return batch.placeholders.to(device)
    if rows == "last":
        return torch.full((batch.size, 1), width - 1, dtype=torch.long, device=device)
    ps = torch.tensor(rows if isinstance(rows, tuple) else (rows,), dtype=torch.long, device=device)
    return torch.where(ps < 0, width + ps, _starts(batch, device).unsqueeze(1) + ps)  # [B, k]


def row_mask(rows: Rows, batch: Batch, width: int, device: torch.device) -> Bool[Tensor, "b l"]:
    """``[B, L]``: which columns of a left-padded batch ``rows`` names (``all``: every token, pads excluded;
    ``sentence``: the last ``{text}`` slot; ``prompt``: neither sentence nor placeholder nor pad)."""
    b = batch.size
    real = torch.zeros((b, width), dtype=torch.bool, device=device)
    start = _starts(batch, device)
    real |= torch.arange(width, device=device).unsqueeze(0) >= start.unsqueeze(1)
    if rows == "all":
        return real
    text = batch.text_mask.to(device) > 0
    if rows == "sentence":
        return text
    ph = torch.zeros((b, width), dtype=torch.bool, device=device)
    if batch.placeholders.shape[1]:
        ph[torch.arange(b, device=device).unsqueeze(1), batch.placeholders.to(device)] = True
    if rows == "prompt":
        return real & ~text & ~ph
    if rows == "placeholders":
        return ph
    out = torch.zeros((b, width), dtype=torch.bool, device=device)
    out[torch.arange(b, device=device).unsqueeze(1), row_index(rows, batch, width, device)] = True
    return out


def capture(h: Float[Tensor, "b l w"], rows: Rows, batch: Batch) -> Float[Tensor, "b k w"]:
    """``[B, k, width]``: the rows of ``h`` an ``add`` / ``subtract`` edit of another run reads (a copy)."""
    ar = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    return h[ar, row_index(rows, batch, h.shape[1], h.device)].clone()


class _Context:
    """The operands an op's tensor function may read (:class:`tpsurgery.ops.OpContext`), for one edit."""

    def __init__(self, e: Edit, x: Tensor, orig: Tensor, heads: Tensor, batch: Batch, captured: Captured):
        self.e, self.x, self.orig, self.heads, self.batch, self.captured = e, x, orig, heads, batch, captured

    def row(self, position: int) -> Float[Tensor, "b 1 h d"]:
        x = self.x
        col = x.shape[1] + position if position < 0 else _starts(self.batch, x.device) + position
        return x[torch.arange(x.shape[0], device=x.device), col].unsqueeze(1).clone()

    def vector(self) -> Float[Tensor, "h d"]:
        e, (h, d) = self.e, self.x.shape[-2:]
        if e.vector.tensor.numel() != h * d:
            raise BackendError(f"recipe field `{e.field}`: a vector of {e.vector.tensor.numel()} values for rows "
                               f"{h * d} wide", e.layer)
        return rearrange(e.vector.tensor, "(h d) -> h d", h=h).to(self.x.device)

    def other(self) -> Float[Tensor, "b l h d"]:
        e, x = self.e, self.x
        rows = self.captured.get((e.run, e.site, e.layer, e.rows))
        if rows is None:
            raise BackendError(f"recipe field `{e.field}`: run {e.run!r} provided no rows at this site", e.layer)
        idx = row_index(e.rows, self.batch, x.shape[1], x.device)
        want = (x.shape[0], idx.shape[1], x.shape[2] * x.shape[3])
        if tuple(rows.shape) != want:
            raise BackendError(f"recipe field `{e.field}`: run {e.run!r} gave rows of shape {tuple(rows.shape)} "
                               f"for rows of shape {want}", e.layer)
        placed = torch.zeros_like(x)
        placed[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx] = \
            rearrange(rows.to(x.device, x.dtype), "b k (h d) -> b k h d", h=x.shape[2])
        return placed

    def norm(self, t: Float[Tensor, "b l h d"]) -> Float[Tensor, "b l 1 1"]:
        sel = t if bool(self.heads.all()) else t[:, :, self.heads]
        return torch.linalg.vector_norm(sel.flatten(2), dim=-1)[..., None, None]


def _heads(e: Edit, width: int, n_heads: int | None, device: torch.device) -> Bool[Tensor, "h"]:
    """The edited head groups: one group of the whole width, or the model's heads with ``e.heads`` selected."""
    if e.heads is None:
        return torch.ones(1, dtype=torch.bool, device=device)
    if not n_heads or width % n_heads:
        raise BackendError(f"recipe field `{e.field}`: cannot split a width of {width} into {n_heads} heads", e.layer)
    sel = torch.zeros(n_heads, dtype=torch.bool, device=device)
    sel[list(e.heads)] = True
    return sel


def apply_edits(h: Float[Tensor, "b l w"], edits: Sequence[Edit], batch: Batch, captured: Captured | None = None,
                n_heads: int | None = None) -> Float[Tensor, "b l w"]:
    """A copy of ``h`` with ``edits`` (one site of one layer) applied in order."""
    out = h.clone()
    for e in edits:
        if e.rows == "placeholders" and batch.placeholders.shape[1] == 0:
            continue  # a template without placeholders: nothing to edit
        heads = _heads(e, h.shape[-1], n_heads, h.device)
        split = "b l (h d) -> b l h d"
        x, orig = rearrange(out, split, h=len(heads)), rearrange(h, split, h=len(heads))
        new = OPS[e.op].fn(e, x, _Context(e, x, orig, heads, batch, captured or {}))
        keep = row_mask(e.rows, batch, h.shape[1], h.device)[:, :, None, None] & heads[None, None, :, None]
        out = rearrange(torch.where(keep, new.to(out.dtype), x), "b l h d -> b l (h d)")
    return out
