"""Batches: encoded rows (:class:`~tpsurgery.prompts.Encoded`) left-padded into model inputs, with where the
placeholders sit, the source column, the sentence tokens and each row's start: what a backend reads besides the plan.

>>> from tpsurgery.prompts import Encoded
>>> b = collate([Encoded(ids=(5, 0, 6, 7), placeholders=(1,), text_span=(2, 3)), Encoded(ids=(5, 0, 8), placeholders=(1,),
...             text_span=(2, 3))], pad_id=9)
>>> b.input_ids.tolist(), b.position_ids.tolist(), b.placeholders.tolist(), b.source.tolist()
([[5, 0, 6, 7], [9, 5, 0, 8]], [[0, 1, 2, 3], [0, 0, 1, 2]], [[1], [2]], [3, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int

from .errors import InputError
from .prompts import Encoded


@dataclass(frozen=True)
class Batch:
    """A left-padded batch: model inputs plus where placeholders sit, which row is the source, what is pooled.

    ``placeholders`` and ``source`` are absolute column indices; ``text_mask`` marks the last ``{text}`` slot's tokens
    (mean pooling); ``text_end`` is each row's end of the sentence (exclusive; end of the bidirectional span);
    ``starts`` each row's first column (positions counted from the start; None: derived from the attention mask).
    """

    input_ids: Int[torch.Tensor, "b l"]
    attention_mask: Int[torch.Tensor, "b l"]
    position_ids: Int[torch.Tensor, "b l"]
    placeholders: Int[torch.Tensor, "b p"]
    source: Int[torch.Tensor, " b"]
    text_mask: Float[torch.Tensor, "b l"]
    text_end: Int[torch.Tensor, " b"]
    others: tuple[tuple[str, "Batch"], ...] = ()
    starts: Int[torch.Tensor, " b"] | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def other(self, run: str) -> "Batch":
        """The same sentences in auxiliary run ``run``'s prompt (collated on their own)."""
        return dict(self.others)[run]


def collate(rows: Sequence[Encoded], pad_id: int, reach: int = -1, indices: Sequence[int] | None = None,
            hide_placeholders: bool = False, min_length: int | None = None) -> Batch:
    """Left-pad encoded rows into a :class:`Batch`; position ids count visible tokens only (``cumsum(mask) - 1``).

    ``reach`` (:attr:`Plan.reach`) gives ``Batch.source``; rows shorter than ``min_length`` (default ``-reach``;
    :attr:`Plan.min_length`) are rejected. ``hide_placeholders`` gives placeholder columns attention mask 0 (nothing attends to them, no position id).
    Rows that carry auxiliary runs' encodings (:attr:`Encoded.others`) get those collated as ``Batch.others``.
    """
    indices = list(indices) if indices is not None else list(range(len(rows)))
    width = max(len(r.ids) for r in rows)
    n_ph = {len(r.placeholders) for r in rows}
    if len(n_ph) != 1:
        raise InputError(None, "rows of one batch must share their template (different placeholder counts)")
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    text = torch.zeros((len(rows), width), dtype=torch.float32)
    ph = torch.zeros((len(rows), n_ph.pop()), dtype=torch.long)
    text_end = torch.zeros(len(rows), dtype=torch.long)
    starts = torch.zeros(len(rows), dtype=torch.long)
    need = -reach if min_length is None else min_length
    for b, (r, idx) in enumerate(zip(rows, indices)):
        if len(r.ids) == 0:
            raise InputError(idx, "the prompted input has no tokens (empty text and no prompt)")
        if len(r.ids) < need:
            raise InputError(idx, f"the recipe reads {need} positions (tp.source, an edit's rows or the pooling) but "
                                  f"this input has {len(r.ids)} tokens")
        off = width - len(r.ids)
        starts[b] = off
        ids[b, off:] = torch.tensor(r.ids)
        mask[b, off:] = 1
        text[b, off + r.text_span[0]: off + r.text_span[1]] = 1.0
        text_end[b] = off + r.text_span[1]
        if r.placeholders:
            ph[b] = torch.tensor(r.placeholders) + off
            if hide_placeholders:
                mask[b, ph[b]] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    src = torch.full((len(rows),), width + reach, dtype=torch.long)
    others = tuple((name, collate([dict(r.others)[name] for r in rows], pad_id, -1, indices))
                   for name, _ in rows[0].others)
    return Batch(ids, mask, pos, ph, src, text, text_end, others, starts)

