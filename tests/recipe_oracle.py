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


def named_vector(kind: str, size: int, seed: int = 0, mean: float = 0.0, std: float = 1.0):
    """The documented named vectors, restated: zeros, ones, U[0, 1) and N(mean, std) from a seeded generator."""
    if kind == "zeros":
        return torch.zeros(size)
    if kind == "ones":
        return torch.ones(size)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, generator=g) if kind == "uniform" else torch.randn(size, generator=g) * std + mean


def schedule(recipe, n_layers: int, exit_layer: int, hidden: int) -> dict:
    """What the recipe asks for, read from the recipe's own fields (never the plan): TP layers below the exit layer,
    TP source and alpha, the placeholder's initial row, and per layer ``(hide placeholders, bidirectional mode)``."""
    tp, m = recipe.tp, exit_layer
    layers = {i for s in tp.spans for i in range(s.start, s.stop)}
    layers |= set(range(tp.resume, n_layers)) if tp.resume is not None else set()
    p = recipe.placeholder
    init = None if p.init == "token" else named_vector(p.init, hidden, p.seed, p.mean, p.std)
    masks: dict[int, tuple[bool, str]] = {}
    if p.mask == "first_layer" and m > 0:
        masks[0] = (True, "none")
    att = recipe.attention
    if att.bidirectional != "none":
        for i in range(att.layers.start, att.layers.stop) if att.layers else range(n_layers):
            if i < m:
                masks[i] = (masks.get(i, (False, "none"))[0], att.bidirectional)
    for e in recipe.edits:
        if e.site == "attn_mask":
            for i in e.layer_list():
                if i < m:
                    hide, mode = masks.get(i, (False, "none"))
                    masks[i] = (hide or e.op == "hide", e.mode if e.op == "bidirectional" else mode)
    return {"tp_layers": tuple(sorted(i for i in layers if i < m)), "source": tp.source, "alpha": tp.alpha,
            "init_vector": init, "masks": masks}


def hidden_for_row(hf, row, recipe, exit_layer, tp_layers=None):
    """HF ``hidden_states`` of one encoded row (``prompts.Encoded``) with the recipe's edits done by hooks."""
    types = getattr(hf.config, "layer_types", None)
    dtype = next(hf.parameters()).dtype
    n_layers = len(decoder_layers(hf))
    sched = schedule(recipe, n_layers, exit_layer, hf.get_input_embeddings().weight.shape[1])
    length = len(row.ids)
    ph = list(row.placeholders)
    ones = torch.ones((1, length), dtype=torch.long)
    masks: dict[tuple, torch.Tensor] = {}  # the same rule for every layer of one kind
    layer_masks = {}
    for i, (hide, mode) in (sched["masks"].items() if ph else ()):
        window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
        key = (window, hide, mode)
        if key not in masks:
            ok = rule(ones, torch.tensor([ph]), torch.tensor([row.text_span[1]]), mask_placeholders=hide,
                      bidirectional=mode, window=window)
            masks[key] = additive(ok, dtype)
        layer_masks[i] = masks[key]
    return reference_hidden(hf, torch.tensor([row.ids]), ones, torch.arange(length)[None],
                            placeholders=torch.tensor([ph], dtype=torch.long), source=sched["source"],
                            tp_layers=sched["tp_layers"] if tp_layers is None else tp_layers, alpha=sched["alpha"],
                            init_vector=sched["init_vector"], layer_masks=layer_masks)


def oracle_embed(emb, texts, tp_layers=None) -> torch.Tensor:
    """What ``emb.encode(texts)`` must return, recomputed one sentence at a time with plain hooks; the pooling
    (token pooling, the ``hidden_states`` indices read and their weights) restated from the recipe."""
    m = emb.plan.exit_layer  # the resolved exit layer (the recipe's, or the embedder's override)
    p = emb.recipe.pooling
    n = len(decoder_layers(emb.model))
    tokens, k, layers, weights = (p, 1, None, None) if isinstance(p, str) else (p.tokens, p.k, p.layer_list(),
                                                                                 p.weights)
    reads = [m] if layers is None else [j if j >= 0 else n + 1 + j for j in layers]
    per_template = []
    for template in emb.recipe.templates:
        outs = []
        for row in emb.tokenize(texts, template):
            hs = hidden_for_row(emb.model, row, emb.recipe, m, tp_layers)
            vecs = []
            for j in reads:
                h = hs[j][0].float()
                vecs.append(h[-1] if tokens == "last" else h[-k:].mean(0) if tokens == "last_k"
                            else h[row.text_span[0]:row.text_span[1]].mean(0))
            w = weights or [1.0 / len(vecs)] * len(vecs)
            outs.append(vecs[0] if len(vecs) == 1 else sum(wi * v for wi, v in zip(w, vecs)))
        per_template.append(torch.stack(outs))
    return torch.stack(per_template).mean(0)
