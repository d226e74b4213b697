"""A plain-hook reference for Contrastive Prompting (CP; Cheng et al., ACL 2025), independent of the engine.

The official code (github zifengcheng/CP, ``evaluate_intervention.py`` + ``activation_intervention/__init__.py``),
restated: the auxiliary prompt runs up to decoder layer ``l`` and the last token's row ``B`` of the input of layer
``l``'s attention output projection is kept (the run stops after that); the normal prompt then runs with a
forward-pre-hook on the same module that replaces the last token's row ``A`` of that input by

* ``scaled``: ``C * (A - B)``
* ``norm``:   ``(A - B) * ||A|| / (||A - B|| + 1e-7)`` (the epsilon is added to the norm of the difference)

all heads at once (the whole concatenated-heads vector), and the embedding is HF's ``hidden_states[exit]`` at the
last token. Optionally Token Prepending (TP) is done too, through the suite's one TP hook reference
(``prop_support.reference_hidden``), on the normal run and, if asked, on the auxiliary run.

One sentence at a time, unpadded, plain PyTorch hooks. :func:`tl_cp_embed` does the same edit through a
TransformerLens bridge at ``blocks.{l}.attn.o.hook_in`` (head-split [B, L, n_heads, head_dim]; flattened it is the HF
module's input), for the TransformerLens backend's tests. The o_proj-like module is found from this file's own table
(never from ``tpsurgery.arch``): its input is the concatenation of the per-head attention outputs,
[B, L, n_heads * head_dim] with head h in columns h*hd:(h+1)*hd (checked per family in tests/test_cp_oracle.py).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from prop_support import decoder_parts, reference_hidden

EPS = 1e-7  # the official code's epsilon (activation_intervention/__init__.py, norm strategies)

_LLAMA_LIKE = "self_attn.o_proj"
O_PROJ: dict[str, str] = {  # config.model_type -> path of the o_proj-like module relative to one decoder layer
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                "mixtral", "qwen2_moe", "qwen3_moe", "olmo", "olmo2", "granite", "cohere", "stablelm",
                                "starcoder2", "smollm3")},
    "gpt2": "attn.c_proj",             # Conv1D; NOT mlp.c_proj
    "gpt_neox": "attention.dense",
    "opt": "self_attn.out_proj",
    "falcon": "self_attention.dense",  # FalconLinear (an nn.Linear subclass)
}


@dataclass(frozen=True)
class CP:
    """One CP edit: decoder layer ``layer`` (0-based), ``mode`` "scaled" or "norm", coefficient ``coeff`` (scaled)."""

    layer: int
    mode: str = "scaled"
    coeff: float = 1.0
    eps: float = EPS


def o_proj_module(model, layer: int):
    """The o_proj-like module of decoder layer ``layer`` (KeyError for a family missing from :data:`O_PROJ`)."""
    path = O_PROJ[model.config.model_type]
    return functools.reduce(getattr, path.split("."), decoder_parts(model)[0][layer])


def edited_row(a: torch.Tensor, b: torch.Tensor, cp: CP) -> torch.Tensor:
    """The official formulas on one row (or a stack of rows; norms over the last dim)."""
    diff = a - b
    if cp.mode == "scaled":
        return cp.coeff * diff
    if cp.mode == "norm":
        return diff * (a.norm(dim=-1, keepdim=True) / (diff.norm(dim=-1, keepdim=True) + cp.eps))
    raise ValueError(f"unknown CP mode {cp.mode!r}")


class _Stop(Exception):
    """Raised inside the auxiliary run once B is captured (the run goes no further)."""


def _one(ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([list(ids)])
    return ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None]


def _tp_kwargs(row, tp: dict | None) -> dict:
    """reference_hidden's TP arguments for one encoded row (``tp``: source, tp_layers, alpha, init_vector)."""
    if not tp or not getattr(row, "placeholders", ()):
        return {}
    return {"placeholders": torch.tensor([list(row.placeholders)], dtype=torch.long), **tp}


def aux_row(model, row, layer: int, tp: dict | None = None) -> torch.Tensor:
    """B: the last token's row of the o_proj-like input of ``layer`` on the auxiliary prompt ``row`` (ids or an
    encoded row with ``.ids``); the forward stops at that module (nothing after it runs). ``tp``: TP on this run too."""
    ids = getattr(row, "ids", row)
    got: list[torch.Tensor] = []

    def grab(mod, args):
        got.append(args[0][0, -1].detach().clone())
        raise _Stop

    handle = o_proj_module(model, layer).register_forward_pre_hook(grab)
    try:
        reference_hidden(model, *_one(ids), **_tp_kwargs(row, tp))
    except _Stop:
        pass
    finally:
        handle.remove()
    if len(got) != 1:
        raise AssertionError(f"the o_proj-like module of layer {layer} ran {len(got)} times in the auxiliary run")
    return got[0]


@contextmanager
def cp_edit(model, cp: CP, b: torch.Tensor, seen: list | None = None):
    """A forward-pre-hook replacing the last row A of the o_proj-like input of ``cp.layer`` by the CP row.

    ``seen`` (optional list): gets ``(A, A')`` of every call, for the self-tests."""
    def hook(mod, args):
        x = args[0].clone()
        a = x[:, -1].clone()
        x[:, -1] = edited_row(a, b.to(x.dtype), cp)
        if seen is not None:
            seen.append((a, x[:, -1].clone()))
        return (x, *args[1:])

    handle = o_proj_module(model, cp.layer).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def cp_hidden(model, row, aux, cp: CP | None, tp: dict | None = None, aux_tp: bool = False,
              seen: list | None = None):
    """HF ``hidden_states`` of the normal prompt ``row`` with CP (``aux``: the auxiliary prompt's row) and optional
    TP (``tp``: reference_hidden's source / tp_layers / alpha / init_vector; ``aux_tp``: TP on the auxiliary run too).
    ``cp=None``: no CP (the plain / TP-only reference). ``seen``: see :func:`cp_edit`."""
    ids = getattr(row, "ids", row)
    if cp is None:
        return reference_hidden(model, *_one(ids), **_tp_kwargs(row, tp))
    b = aux_row(model, aux, cp.layer, tp if aux_tp else None)
    with cp_edit(model, cp, b, seen):
        return reference_hidden(model, *_one(ids), **_tp_kwargs(row, tp))


def cp_embed(model, rows, aux_rows, cp: CP | None, exit_layer: int, tp: dict | None = None,
             aux_tp: bool = False) -> torch.Tensor:
    """[N, d] float32: the last token of ``hidden_states[exit_layer]``, one sentence at a time."""
    out = [cp_hidden(model, r, a, cp, tp, aux_tp)[exit_layer][0, -1].float() for r, a in zip(rows, aux_rows)]
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- TransformerLens
TL_SITE = "blocks.{layer}.attn.o.hook_in"  # head-split [B, L, n_heads, head_dim]; flatten(-2) == HF o_proj input


def tl_aux_row(bridge, ids, layer: int) -> torch.Tensor:
    """B through a TransformerLens bridge: the last row of the flattened ``o.hook_in`` of ``layer``; stops there."""
    got: list[torch.Tensor] = []

    def grab(t, hook):
        got.append(t.flatten(-2)[0, -1].detach().clone())
        raise _Stop

    try:
        with torch.no_grad():
            bridge.run_with_hooks(torch.tensor([list(ids)]), fwd_hooks=[(TL_SITE.format(layer=layer), grab)],
                                  return_type=None)
    except _Stop:
        pass
    (b,) = got
    return b


def tl_cp_embed(bridge, ids, aux_ids, cp: CP, exit_layer: int) -> torch.Tensor:
    """[d] float32: the last token of ``hidden_states[exit_layer]`` (1 <= exit_layer < n_layers, i.e.
    ``blocks.{exit_layer - 1}.hook_resid_post``) with the CP edit done at ``o.hook_in`` of a TL bridge."""
    b = tl_aux_row(bridge, aux_ids, cp.layer)
    read: list[torch.Tensor] = []

    def edit(t, hook):
        shape = t.shape
        x = t.flatten(-2).clone()
        x[:, -1] = edited_row(x[:, -1].clone(), b.to(x.dtype), cp)
        return x.reshape(shape)

    def grab(t, hook):
        read.append(t[0, -1].detach().float().clone())
        raise _Stop

    try:
        with torch.no_grad():
            bridge.run_with_hooks(torch.tensor([list(ids)]), return_type=None,
                                  fwd_hooks=[(TL_SITE.format(layer=cp.layer), edit),
                                             (f"blocks.{exit_layer - 1}.hook_resid_post", grab)])
    except _Stop:
        pass
    (h,) = read
    return h
