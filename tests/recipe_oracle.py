"""A plain-PyTorch reference for whole recipes, mask edits included (used by test_masks and test_recipes_library).

One sentence at a time (no padding, no nnsight, no masking_utils), through the suite's one hook reference
(``prop_support.reference_hidden``): the placeholder's initial row is written by a forward hook on the embedding
module; a forward-pre-hook on each scheduled layer overwrites the placeholder rows with the source row and swaps in an
additive float mask built by explicit loops from the documented rule; the read is HF's ``output_hidden_states[M]``,
pooled at the last token or averaged over the last ``{text}`` slot; templates averaged.
"""

from __future__ import annotations

import torch

from prop_support import decoder_parts, reference_hidden


def rule(ids_mask, placeholders, text_end, *, mask_placeholders, bidirectional, window):
    """Loop-built boolean mask [B, L, L] (query row, key column): the definition in docs/recipes.md."""
    bsz, length = ids_mask.shape
    out = torch.zeros((bsz, length, length), dtype=torch.bool)
    for b in range(bsz):
        ph = {int(p) for p in placeholders[b]}
        first, end = min(ph), int(text_end[b])
        real = [bool(x) for x in ids_mask[b]]
        rows = []
        for q in range(length):
            row = []
            for kv in range(length):
                ok = kv <= q and (window is None or q - kv < window)
                if bidirectional == "last_token" and q >= first and kv == length - 1:
                    ok = True
                if bidirectional == "sentence" and first <= q < end and first <= kv < end:
                    ok = True
                if mask_placeholders and kv in ph and kv != q:
                    ok = False
                row.append(ok and real[kv])
            if not any(row):  # padding query: keep its diagonal so no row is empty
                row[q] = True
            rows.append(row)
        out[b] = torch.tensor(rows)
    return out


def additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, L] bool -> [B, 1, L, L] additive float mask (0 allowed, dtype min elsewhere)."""
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min).unsqueeze(1)


def decoder_layers(hf):
    return decoder_parts(hf)[0]


def hidden_for_row(hf, row, plan, tp_layers=None):
    """HF ``hidden_states`` of one encoded row (``prompts.Encoded``) with the plan's edits done by hooks."""
    types = getattr(hf.config, "layer_types", None)
    dtype = next(hf.parameters()).dtype
    length = len(row.ids)
    ph = list(row.placeholders)
    ones = torch.ones((1, length), dtype=torch.long)
    masks: dict[tuple, torch.Tensor] = {}  # the same rule for every layer of one kind
    layer_masks = {}
    for i in (range(len(decoder_layers(hf))) if ph else ()):
        if i not in plan.mask_layers and i not in plan.bidirectional_layers:
            continue
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        key = (window, i in plan.mask_layers, plan.bidirectional if i in plan.bidirectional_layers else "none")
        if key not in masks:
            ok = rule(ones, torch.tensor([ph]), torch.tensor([row.text_span[1]]), mask_placeholders=key[1],
                      bidirectional=key[2], window=window)
            masks[key] = additive(ok, dtype)
        layer_masks[i] = masks[key]
    return reference_hidden(hf, torch.tensor([row.ids]), ones, torch.arange(length)[None],
                            placeholders=torch.tensor([ph], dtype=torch.long), source=plan.source,
                            tp_layers=plan.tp_layers if tp_layers is None else tp_layers, alpha=plan.alpha,
                            init_vector=plan.init_vector, layer_masks=layer_masks)


def oracle_embed(emb, texts, tp_layers=None) -> torch.Tensor:
    """What ``emb.encode(texts)`` must return, recomputed one sentence at a time with plain hooks."""
    plan = emb.plan
    per_template = []
    for template in emb.recipe.templates:
        outs = []
        for row in emb.tokenize(texts, template):
            hs = hidden_for_row(emb.model, row, plan, tp_layers)[plan.exit_layer][0].float()
            outs.append(hs[-1] if plan.pooling == "last" else hs[row.text_span[0]:row.text_span[1]].mean(0))
        per_template.append(torch.stack(outs))
    return torch.stack(per_template).mean(0)
