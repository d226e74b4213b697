"""A plain-hook reference for edit lists (issue 12): one unpadded sentence, edits applied row by row by forward hooks
on the Hugging Face modules, written without tpsurgery's engine (not its surgery functions, arch table or plans).

Sites: ``embed`` = forward hook on the token embedding (Granite, which multiplies the embedding output inside the
model: layer 0's input, i.e. ``hidden_states[0]``); ``layer_in`` = forward pre-hook on decoder layer i;
``attn_out_in`` = forward pre-hook on layer i's attention output projection (paths below, checked by the CP helper
against each family's head layout); ``layer_out`` = forward hook on decoder layer i. The read is hidden_states[M]:
layer 0's input before its edits (M = 0), layer M-1's output after its edits, or the final norm's output (M = n).
"""

from __future__ import annotations

import torch

from prop_support import _hidden_arg, _with_hidden, decoder_parts

O_PROJ = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "opt": "self_attn.out_proj",
          "falcon": "self_attention.dense"}


def o_proj(model, layer):
    obj = layer
    for part in O_PROJ.get(model.config.model_type, "self_attn.o_proj").split("."):
        obj = getattr(obj, part)
    return obj


def positions(rows, length: int, placeholders: list[int], text_span=(0, 0)) -> list[int]:
    """The rows a selector names in an unpadded sequence, each once, in order (docs/recipes.md)."""
    if rows == "placeholders":
        return list(placeholders)
    if rows == "last":
        return [length - 1]
    if rows == "all":
        return list(range(length))
    if rows == "sentence":
        return list(range(*text_span))
    if rows == "prompt":
        return [p for p in range(length) if p not in placeholders and not text_span[0] <= p < text_span[1]]
    if isinstance(rows, dict):  # a span of positions
        rows = list(range(rows["start"], rows["stop"]))
    ps = list(rows) if isinstance(rows, (list, tuple)) else [rows]
    return sorted({p if p >= 0 else length + p for p in ps})


def _hashable(rows):
    return tuple(rows) if isinstance(rows, list) else rows


def columns(e: dict, width: int, n_heads: int) -> list[int]:
    if not e.get("heads"):
        return list(range(width))
    hd = width // n_heads
    return [c for h in e["heads"] for c in range(h * hd, (h + 1) * hd)]


def apply_row_edits(h: torch.Tensor, edits: list[dict], placeholders: list[int], captured: dict, n_heads: int,
                    text_span=(0, 0)):
    """``h`` [1, L, w] edited in order, one row and column list at a time."""
    h = h.clone()
    orig = h.clone()
    length = h.shape[1]
    for e in edits:
        ps = positions(e["rows"], length, placeholders, text_span)
        cols = torch.tensor(columns(e, h.shape[-1], n_heads))
        if e["op"] == "copy":
            src = h[0, length + e["source"], cols].clone()
        for k, p in enumerate(ps):
            row = h[0, p, cols]
            if e["op"] == "write":
                new = e["vector"][cols].to(h.dtype)
            elif e["op"] == "copy":
                new = e["alpha"] * src + (1 - e["alpha"]) * row if e["alpha"] != 1.0 else src
            elif e["op"] in ("add", "subtract"):
                other = captured[(e["run"], e["site"], e["layer"])][k, cols] if "run" in e else e["vector"][cols]
                new = row + other if e["op"] == "add" else row - other
            elif e["op"] == "scale":
                new = row * e["factor"]
            elif e["op"] == "recover_norm":
                new = row * (orig[0, p, cols].norm() / (row.norm() + e["eps"]))
            else:
                raise NotImplementedError(f"the reference does not know op {e['op']!r}: add it here")
            h[0, p, cols] = new.to(h.dtype)
    return h


def _run(model, ids, hooks):
    handles = [module_hook() for module_hook in hooks]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids),
                  position_ids=torch.arange(ids.shape[1])[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _site_hooks(model, site: str, layer: int, fn):
    """Hook registrations that pass the site's tensor through ``fn`` (returning the replacement or None)."""
    layers, embed, _, _ = decoder_parts(model)
    if site == "embed" and getattr(model.config, "embedding_multiplier", 1.0) == 1.0:
        return lambda: embed.register_forward_hook(lambda m, a, out: fn(out))
    if site == "embed":  # Granite scales the embedding output inside the model: hidden_states[0] is layer 0's input
        site, layer = "layer_in", 0
    if site == "layer_in":
        def pre(m, args, kwargs):
            new = fn(_hidden_arg(args, kwargs))
            return None if new is None else _with_hidden(args, kwargs, new)
        return lambda: layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    if site == "attn_out_in":
        def pre_o(m, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return lambda: o_proj(model, layers[layer]).register_forward_pre_hook(pre_o)

    def post(m, a, out):
        t = out[0] if isinstance(out, tuple) else out
        new = fn(t)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return lambda: layers[layer].register_forward_hook(post)


def reference_read(model, ids: list[int], placeholders: list[int], edits: list[dict], exit_layer: int,
                   runs: dict[str, list[int]] | None = None, text_span=(0, 0)) -> torch.Tensor:
    """``hidden_states[exit_layer]`` [L, d] of one sentence with ``edits`` (dicts: site, layer, op, rows, ... and
    ``vector`` for write), auxiliary runs given as token ids."""
    n_heads = model.config.num_attention_heads
    layers, _, norm, _ = decoder_parts(model)
    captured: dict = {}
    for name, aux_ids in (runs or {}).items():
        wanted = {(e["site"], e["layer"], _hashable(e["rows"])) for e in edits if e.get("run") == name}
        hooks = []
        for site, layer, rows in wanted:
            def grab(t, key=(name, site, layer), rows=rows):
                captured[key] = t[0, positions(rows, t.shape[1], [])].clone()
            hooks.append(_site_hooks(model, site, layer, grab))
        _run(model, torch.tensor([aux_ids]), hooks)
    hooks, read = [], {}
    n = len(layers)

    def keep(t):
        read["h"] = t[0].clone()  # returns None: the tensor flows on unchanged
    groups: dict = {}
    for e in edits:
        groups.setdefault((e["site"], e["layer"]), []).append(e)

    def edit_hook(site, layer):
        group = groups[(site, layer)]
        return _site_hooks(model, site, layer,
                           lambda t: apply_row_edits(t, group, placeholders, captured, n_heads, text_span))
    # embed edits, then the read of hidden_states[0], then the rest: on Granite the embed site is layer 0's input too,
    # and pre-hooks of one module run in registration order
    hooks += [edit_hook(*key) for key in groups if key[0] == "embed"]
    if exit_layer == 0:
        hooks.append(_site_hooks(model, "layer_in", 0, keep))
    hooks += [edit_hook(*key) for key in groups if key[0] != "embed"]
    if 0 < exit_layer < n:
        hooks.append(_site_hooks(model, "layer_out", exit_layer - 1, keep))
    elif exit_layer == n:
        hooks.append(lambda: norm.register_forward_hook(lambda m, a, out: keep(out)))
    _run(model, torch.tensor([ids]), hooks)
    return read["h"]
