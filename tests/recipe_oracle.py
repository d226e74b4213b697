"""A plain-PyTorch reference for whole recipes, mask edits included (used by test_masks and test_recipes_library).

One sentence at a time (no padding, no nnsight, no masking_utils): the placeholder's initial row is written by a
forward hook on the embedding module; a forward-pre-hook on each scheduled layer overwrites the placeholder rows with
the last row and swaps in an additive float mask built by explicit loops from the documented rule; the read is HF's
``output_hidden_states[M]``, pooled at the last token or averaged over the last ``{text}`` slot; templates averaged.
"""

from __future__ import annotations

import torch


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
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = hf
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError(f"cannot find the layers of {type(hf).__name__}")


def swap_mask(args, kwargs, mask):
    """Put ``mask`` where the caller passed the attention mask (GPT-2 passes it as the third positional arg)."""
    if "attention_mask" in kwargs or len(args) < 3:
        return args, {**kwargs, "attention_mask": mask}
    return (*args[:2], mask, *args[3:]), kwargs


def hidden_for_row(hf, row, plan, tp_layers=None):
    """HF ``hidden_states`` of one encoded row (``prompts.Encoded``) with the plan's edits done by hooks."""
    layers = decoder_layers(hf)
    types = getattr(hf.config, "layer_types", None)
    dtype = next(hf.parameters()).dtype
    length = len(row.ids)
    ph = list(row.placeholders)
    tp_layers = plan.tp_layers if tp_layers is None else tp_layers
    handles = []
    if ph and plan.init_vector is not None:
        def init(mod, args, out):
            out = out.clone()
            out[0, ph] = plan.init_vector.to(out.dtype)
            return out
        handles.append(hf.get_input_embeddings().register_forward_hook(init))
    ones = torch.ones((1, length), dtype=torch.long)
    masks: dict[tuple, torch.Tensor] = {}  # the same rule for every layer of one kind
    for i in range(len(layers)):
        masked = ph and (i in plan.mask_layers or i in plan.bidirectional_layers)
        tp = ph and i in tp_layers
        if not (masked or tp):
            continue
        mask = None
        if masked:
            window = hf.config.sliding_window if types and types[i] == "sliding_attention" else None
            key = (window, i in plan.mask_layers, plan.bidirectional if i in plan.bidirectional_layers else "none")
            if key not in masks:
                ok = rule(ones, torch.tensor([ph]), torch.tensor([row.text_span[1]]), mask_placeholders=key[1],
                          bidirectional=key[2], window=window)
                masks[key] = additive(ok, dtype)
            mask = masks[key]

        def hook(mod, args, kwargs, mask=mask, tp=tp):
            if tp:
                h = args[0].clone()
                src = h[0, length + plan.source].clone()
                for p in ph:
                    h[0, p] = plan.alpha * src + (1 - plan.alpha) * h[0, p]
                args = (h, *args[1:])
            if mask is not None:
                args, kwargs = swap_mask(args, kwargs, mask)
            return args, kwargs
        handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return hf(input_ids=torch.tensor([row.ids]), output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()


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
