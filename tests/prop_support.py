"""Independent oracles and probes for the property suite (tests/test_prop_*.py).

Nothing here imports the engine's prompt, plan or backend code: the oracles re-derive every expectation from the
documented semantics.

* :func:`byte_encode` tokenizes a prompted sentence for the tiny byte-level tokenizer (token id == byte value, no
  merges), so the token sequence, placeholder columns and sentence span follow from UTF-8 bytes alone.
* :func:`reference_hidden` runs the plain transformers model with ``output_hidden_states=True`` and applies TP with
  ordinary forward-pre-hooks (the paper's description), on a left-padded batch with mask-derived position ids.
* :class:`Probe` watches an engine run with plain PyTorch hooks: the model kwargs it received, how often each decoder
  layer / final norm / LM head was entered, whether a layer's body ran, and the hidden state each layer really saw
  (captured at the first sub-module call inside the layer, i.e. after any nnsight edit of the layer input).
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tpsurgery.testing import BOS, tiny_model
from tpsurgery.foreign import observer

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # the tiny tokenizer parses these as special tokens
MARKER = "<PST>"
SLOT = "{text}"
N_LAYERS = 4
HIDDEN = 32
TEST_PAD = 256


# --------------------------------------------------------------------------------------------------------- models
@functools.lru_cache(maxsize=None)
def model_for(arch: str, attn: str | None = None, bos: bool = False, dtype: torch.dtype = torch.float32):
    """One tiny model per (arch, attention implementation, BOS, dtype) for the whole session. Never mutate it."""
    return tiny_model(arch, n_layers=N_LAYERS, hidden=HIDDEN, attn=attn, bos=bos, dtype=dtype)


def decoder_parts(model):
    """(layers, embedding module, final norm, lm_head) located by the test itself, not by the engine's table."""
    for base in ("model", "transformer", "gpt_neox", "model.decoder"):
        obj = model
        try:
            for part in base.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        layers = getattr(obj, "layers", None) or getattr(obj, "h", None)
        if layers is None:
            continue
        embed = next(getattr(obj, n) for n in ("embed_tokens", "wte", "embed_in", "word_embeddings") if hasattr(obj, n))
        norm = next(getattr(obj, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(obj, n))
        return layers, embed, norm, model.get_output_embeddings()
    raise AssertionError(f"test cannot locate the layers of {type(model).__name__}")


def max_length(model) -> int:
    cfg = model.config
    return min(v for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(cfg, k, None), int))


# ------------------------------------------------------------------------------------------------ tokenization
def preprocess(s: str) -> str:
    """The reference preprocessing, restated: end in . ? " or ' (else add '.'); " -> '; final ? -> '.'."""
    if s and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    return s[:-1] + "." if s.endswith("?") else s


@dataclass(frozen=True)
class Row:
    ids: tuple[int, ...]
    placeholders: tuple[int, ...]
    text_span: tuple[int, int]
    truncated: bool = False


def _byte_row(template: str, text: str, ph_id: int, bos: bool, official: bool) -> Row:
    # exact: a marker and one following space vanish; official: the marker becomes a token, the space stays.
    parts = re.split(r"(<PST> ?|\{text\})", template)
    ids: list[int] = [BOS] if bos else []
    phs: list[int] = []
    span = (0, 0)
    for p in parts:
        if p.startswith(MARKER):
            phs.append(len(ids))
            ids.append(ph_id)
            if official and p != MARKER:
                ids.extend(b" ")
        elif p == SLOT:
            b = text.encode()
            span = (len(ids), len(ids) + len(b))
            ids.extend(b)
        else:
            ids.extend(p.encode())
    if span[0] == span[1]:
        span = (len(ids), len(ids))
    return Row(tuple(ids), tuple(phs), span)


def byte_encode(template: str, text: str, *, ph_id: int, bos: bool, preprocessing: bool, official: bool,
                limit: int) -> Row | None:
    """What the engine must feed the model for one sentence; None when it must reject the sentence as too long."""
    if preprocessing:
        text = preprocess(text)
    row = _byte_row(template, text, ph_id, bos, official)
    if len(row.ids) <= limit:
        return row
    lo, hi = 0, len(text)  # largest character prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_byte_row(template, text[:mid], ph_id, bos, official).ids) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    r = _byte_row(template, text[:lo], ph_id, bos, official)
    return Row(r.ids, r.placeholders, r.text_span, truncated=True)


def left_pad(rows: list[Row], pad: int, hide_placeholders: bool = False):
    """input_ids, attention_mask, position_ids (cumsum of the mask - 1) and per-row column offsets."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offs = []
    for b, r in enumerate(rows):
        off = width - len(r.ids)
        offs.append(off)
        ids[b, off:] = torch.tensor(r.ids)
        mask[b, off:] = 1
        if hide_placeholders:
            for p in r.placeholders:
                mask[b, off + p] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, offs


# --------------------------------------------------------------------------------------------------- reference
def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def swap_mask(args, kwargs, mask):
    """Put ``mask`` where the caller passed the attention mask (GPT-2 passes it as the third positional arg)."""
    if "attention_mask" in kwargs or len(args) < 3:
        return args, {**kwargs, "attention_mask": mask}
    return (*args[:2], mask, *args[3:]), kwargs


def reference_hidden(model, ids, mask, pos, *, placeholders=None, source=-1, tp_layers=(), alpha=1.0,
                     init_vector=None, layer_masks=None):
    """HF ``hidden_states`` (tuple of [B, L, d]) of a plain forward with TP done by forward-pre-hooks: the one hook
    reference of the test suite (tests/recipe_oracle.py builds whole recipes on it).

    ``placeholders``: [B, P] absolute columns; the source is column ``L + source`` of every row (left padding).
    ``layer_masks``: {layer: the attention mask that layer gets instead of the model's}.
    """
    layers, embed, _, _ = decoder_parts(model)
    handles = []
    L = ids.shape[1]
    rows = torch.arange(ids.shape[0]).unsqueeze(1)
    has_ph = placeholders is not None and placeholders.shape[1] > 0
    if has_ph and init_vector is not None:
        def init_hook(mod, args, out):
            out = out.clone()
            out[rows, placeholders] = init_vector.to(out.dtype)
            return out
        handles.append(embed.register_forward_hook(init_hook))
    layer_masks = layer_masks or {}
    for i in sorted(set(tp_layers if has_ph else ()) | set(layer_masks)):
        def hook(mod, args, kwargs, tp=has_ph and i in tp_layers, edited=layer_masks.get(i)):
            if tp:
                h = _hidden_arg(args, kwargs).clone()
                for k in range(placeholders.shape[1]):
                    for b in range(h.shape[0]):
                        src = h[b, L + source].clone()
                        h[b, placeholders[b, k]] = alpha * src + (1 - alpha) * h[b, placeholders[b, k]]
                args, kwargs = _with_hidden(args, kwargs, h)
            if edited is not None:
                args, kwargs = swap_mask(args, kwargs, edited)
            return args, kwargs
        handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                        use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states


def pool_rows(h: torch.Tensor, pooling: str, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Pool [B, L, d] the documented way: the last column, or the mean over each row's sentence columns."""
    if pooling == "last":
        return h[:, -1].float()
    return torch.stack([h[b, s:e].float().mean(0) for b, (s, e) in enumerate(spans)])


# ------------------------------------------------------------------------------------------------------- probes
class Probe:
    """Plain PyTorch hooks around an engine run (use as a context manager; every hook is removed on exit)."""

    def __init__(self, model):
        self.model = model
        self.layers, self.embed, self.norm, self.head = decoder_parts(model)
        self.calls: list[dict] = []          # model kwargs of every top-level forward
        self.entered = [0] * len(self.layers)  # forward-pre-hook count per decoder layer
        self.body_ran = [0] * len(self.layers)  # sub-module calls inside each layer
        self.seen: list[list[torch.Tensor]] = [[] for _ in self.layers]  # layer input as the layer's body saw it
        self.outputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.norm_calls = 0
        self.head_calls = 0
        self._handles = []

    def __enter__(self):
        add = self._handles.append
        add(self.model.register_forward_pre_hook(observer(self._top), with_kwargs=True))
        for i, layer in enumerate(self.layers):
            add(layer.register_forward_pre_hook(observer(functools.partial(self._enter, i))))
            add(layer.register_forward_hook(observer(functools.partial(self._out, i))))
            for sub in layer.modules():
                if sub is not layer:
                    add(sub.register_forward_pre_hook(observer(functools.partial(self._sub, i)), with_kwargs=True))
        add(self.norm.register_forward_pre_hook(observer(self._norm)))
        if self.head is not None:
            add(self.head.register_forward_pre_hook(observer(self._head)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _top(self, mod, args, kwargs):
        self.calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    def _enter(self, i, mod, args):
        self.entered[i] += 1
        self._first_sub = True

    def _sub(self, i, mod, args, kwargs):
        self.body_ran[i] += 1
        if len(self.seen[i]) < self.entered[i]:  # first sub-module of this layer call: gets the layer input
            h = args[0] if args else next(iter(kwargs.values()))
            self.seen[i].append(h.detach().clone())

    def _out(self, i, mod, args, out):
        self.outputs[i].append((out[0] if isinstance(out, tuple) else out).detach().clone())

    def _norm(self, mod, args):
        self.norm_calls += 1

    def _head(self, mod, args):
        self.head_calls += 1


# ------------------------------------------------------------------------------------------------- untouched
def _hook_table(model):
    out = {}
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                     "_forward_hooks_always_called"):
            d = getattr(mod, attr, None)
            if d:
                out[(name, attr)] = tuple((k, v if isinstance(v, bool) else id(v)) for k, v in d.items())
    return out


def is_transformers_hook(fn) -> bool:
    """transformers 5 installs output-capturing hooks on first ``output_hidden_states=True`` (engine-notes 6)."""
    return getattr(fn, "__module__", "").startswith("transformers.")


@dataclass
class Snapshot:
    state: dict
    config: dict
    hooks: dict
    training: dict
    grad: dict
    dtype_device: dict
    n_modules: int

    @classmethod
    def of(cls, model) -> "Snapshot":
        return cls(
            state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            config=model.config.to_dict(),
            hooks=_hook_table(model),
            training={n: m.training for n, m in model.named_modules()},
            grad={n: p.requires_grad for n, p in model.named_parameters()},
            dtype_device={n: (p.dtype, p.device) for n, p in model.named_parameters()},
            n_modules=len(list(model.modules())),
        )

    def diff(self, other: "Snapshot") -> list[str]:
        problems = []
        if self.state.keys() != other.state.keys():
            problems.append(f"state_dict keys changed: {self.state.keys() ^ other.state.keys()}")
        for k in self.state.keys() & other.state.keys():
            a, b = self.state[k], other.state[k]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                problems.append(f"tensor {k} changed")
        if self.config != other.config:
            problems.append("config changed: " + str({k for k in self.config.keys() | other.config.keys()
                                                       if self.config.get(k) != other.config.get(k)}))
        if self.hooks != other.hooks:
            problems.append(f"hooks changed: {set(self.hooks.items()) ^ set(other.hooks.items())}")
        for name in ("training", "grad", "dtype_device", "n_modules"):
            if getattr(self, name) != getattr(other, name):
                problems.append(f"{name} changed")
        return problems


@contextmanager
def raising_on_call(module, n: int, exc=RuntimeError):
    """A forward pre-hook on ``module`` that raises on its ``n``-th call (the injected mid-batch failure)."""
    count = [0]

    def hook(mod, args):
        count[0] += 1
        if count[0] == n:
            raise exc(f"injected failure on call {n}")

    h = module.register_forward_pre_hook(observer(hook))
    try:
        yield count
    finally:
        h.remove()


def match_rows(ids: torch.Tensor, mask: torch.Tensor, candidates) -> list[Row]:
    """For each batch row, the longest oracle row that ends it with only padding (mask 0) before it."""
    L = ids.shape[1]
    out = []
    for b in range(ids.shape[0]):
        fits = [r for r in candidates if len(r.ids) <= L and tuple(ids[b, L - len(r.ids):].tolist()) == r.ids
                and not mask[b, : L - len(r.ids)].any()]
        assert fits, f"batch row {b} is no prompted sentence: {ids[b].tolist()}"
        out.append(max(fits, key=lambda r: len(r.ids)))
    return out


class AttentionProbe:
    """Attention probabilities [B, H, L, L] of every layer call (eager attention returns them from its module)."""

    def __init__(self, model):
        self.layers = decoder_parts(model)[0]
        self.weights: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._handles = []
        self._calls = [0] * len(self.layers)

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(observer(functools.partial(self._enter, i))))
            for sub in layer.modules():
                if sub is not layer:
                    self._handles.append(sub.register_forward_hook(observer(functools.partial(self._out, i))))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False

    def _enter(self, i, mod, args):
        self._calls[i] += 1

    def _out(self, i, mod, args, out):
        if len(self.weights[i]) >= self._calls[i] or not isinstance(out, tuple):
            return
        for o in out:
            if torch.is_tensor(o) and o.dim() == 4 and o.shape[-1] == o.shape[-2]:
                self.weights[i].append(o.detach().clone())
                return
