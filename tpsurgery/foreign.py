"""What a model carries besides the recipe: foreign PyTorch hooks, nnsight edits, a running nnsight trace.

A researcher's model is rarely bare: a steering hook registered with ``register_forward_hook``, a global module hook,
or nnsight edits stored with ``with lm.edit(inplace=True): ...`` (or on the copy ``lm.edit()`` returns). tpsurgery
honours them or refuses, never ignores them (:func:`check`):

* **nnsight edits** (stored on the envoy given to ``apply``) are replayed only by a trace of that envoy, so a model
  that carries them runs on the nnsight trace path (not the trace-free fast path, which calls the module directly and
  would drop them); edits stored on a *child* envoy are not replayed by a trace of the whole model (nnsight's rule),
  so they are refused with a :class:`~tpsurgery.errors.ModelError` rather than dropped.
* **PyTorch hooks** (per module or global) fire on every path, but the trace path and the fast path order them
  differently around the recipe's own interventions, so a hooked model also runs on the trace path: foreign hooks
  fire *around* tpsurgery's interventions, as around those of an nnsight trace (a forward pre-hook before the
  recipe's input edits, a forward hook after the recipe's output edits and reads). TransformerLens run on a bridge of
  a *copy* of the model is refused: edits do not travel to the copy and hooks fire around other modules there.
* The embedding cache is bypassed, with a warning, while anything is carried (a hook is code: its effect cannot be
  part of a cache key), and so is prompt-prefix reuse (the prefix's keys/values are computed by a plain forward).
* ``encode`` inside the body of a user's ``with lm.trace(...)`` cannot work (a trace cannot be nested in a trace's
  body): :func:`check_not_in_trace` says so and what to do instead.

Hooks transformers and TransformerLens install themselves (:data:`INERT_HOOK_MODULES`) do not count, nor do hooks marked with
:func:`observer` (a logger, a profiler, a probe: hooks that only watch).

>>> from tpsurgery.testing import tiny_model
>>> model = tiny_model("llama", n_layers=2)[0]
>>> carried(model).any
False
>>> def steer(module, args):
...     return (args[0] + 1.0, *args[1:])
>>> handle = model.model.layers[1].register_forward_pre_hook(steer)
>>> print(carried(model))
a forward pre-hook (steer) on model.layers.1
>>> handle.remove(); carried(model).any
False
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .errors import ModelError, TpsurgeryError

#: modules whose hook functions are the libraries' own wiring, not model changes: transformers' output capturing (it
#: records hidden states only while ``output_hidden_states`` is asked for, and tpsurgery never asks) and a
#: TransformerLens bridge's capture hooks (``BlockBridge._maybe_wire_capture_hooks``, installed on the first run: they
#: route values through the bridge's hook points, where hooks a user adds with ``add_hook`` do count)
INERT_HOOK_MODULES = ("transformers.utils.output_capturing", "transformer_lens.model_bridge")

_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))


def _name(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _inert(fn: Any) -> bool:
    if getattr(fn, "__tpsurgery_observer__", False):
        return True
    return (getattr(getattr(fn, "func", fn), "__module__", None) or "").startswith(INERT_HOOK_MODULES)


def observer(hook: Any) -> Any:
    """``hook`` marked as one that only watches (returns None, writes nothing in place): tpsurgery then ignores it, so
    the model keeps the fast path, the embedding cache and prompt-prefix reuse. A marked hook that does change values
    makes embeddings depend on the path taken and the cache stale: mark only watchers.

    >>> from tpsurgery.testing import tiny_model
    >>> model, seen = tiny_model("llama", n_layers=1)[0], []
    >>> h = model.model.layers[0].register_forward_hook(observer(lambda mod, args, out: seen.append(out.shape)))
    >>> carried(model).any
    False
    >>> h.remove()
    """
    @functools.wraps(hook)
    def watching(*args: Any, **kwargs: Any) -> Any:
        return hook(*args, **kwargs)

    watching.__tpsurgery_observer__ = True  # type: ignore[attr-defined]
    return watching


@dataclass(frozen=True)
class Carried:
    """What a model carries: ``hooks`` (one description per foreign hook) and ``edits`` (nnsight edits stored on
    the envoy that runs it)."""

    hooks: tuple[str, ...] = ()
    edits: int = 0

    @property
    def any(self) -> bool:
        """Whether anything besides the recipe changes what the model computes."""
        return bool(self.hooks or self.edits)

    def __str__(self) -> str:
        parts = [f"{self.edits} nnsight edit{'s' * (self.edits != 1)} (stored with .edit())"] if self.edits else []
        shown = list(self.hooks[:3]) + ([f"{len(self.hooks) - 3} more hooks"] if len(self.hooks) > 3 else [])
        return ", ".join(parts + shown) or "nothing"


def module_hooks(model: Any) -> list[str]:
    """Descriptions of the foreign forward and forward pre-hooks on ``model`` and its submodules.

    >>> from tpsurgery.testing import tiny_model
    >>> m = tiny_model("gpt2", n_layers=1)[0]
    >>> h = m.transformer.h[0].mlp.register_forward_hook(lambda mod, args, out: out * 2)
    >>> module_hooks(m)
    ['a forward hook (<lambda>) on transformer.h.0.mlp']
    >>> h.remove()
    """
    found = []
    for name, module in model.named_modules():
        for attr, kind in _KINDS:
            for fn in getattr(module, attr, {}).values():
                if not _inert(fn):
                    found.append(f"a {kind} ({_name(fn)}) on {name or 'the model itself'}")
    return found


def global_hooks() -> list[str]:
    """Descriptions of the global module hooks (``torch.nn.modules.module.register_module_forward_hook`` and
    ``..._pre_hook``), which fire on every module of every model."""
    from torch.nn.modules import module as torch_module

    found = []
    for attr, kind in (("_global_forward_pre_hooks", "forward pre-hook"), ("_global_forward_hooks", "forward hook")):
        for fn in getattr(torch_module, attr, {}).values():
            if not _inert(fn):
                found.append(f"a global module {kind} ({_name(fn)})")
    return found


def envoy_edits(envoy: Any) -> int:
    """The number of nnsight edits stored on ``envoy`` (replayed by each of its traces); a :class:`ModelError` when
    one of its child envoys stores edits (a trace of the whole model never replays those)."""
    if envoy is None:
        return 0
    stack = list(getattr(envoy, "_children", ()))
    while stack:
        child = stack.pop()
        if getattr(child, "_edits", None):
            path = getattr(child, "path", None) or type(getattr(child, "_module", child)).__name__
            raise ModelError(f"nnsight edits are stored on a child envoy ({path}); a trace of the whole model does not "
                             "replay them (nnsight replays only the traced envoy's own edits), so tpsurgery would "
                             "ignore them. Store them on the model's envoy instead (with lm.edit(inplace=True): "
                             "lm.<path to the module>.output[...] = ...), or clear them with .clear_edits()")
        stack.extend(getattr(child, "_children", ()))
    return len(getattr(envoy, "_edits", None) or ())


def carried(model: Any, envoy: Any = None) -> Carried:
    """What ``model`` (and the nnsight ``envoy`` that runs it, if any) carries besides the recipe."""
    return Carried(tuple(module_hooks(model) + global_hooks()), envoy_edits(envoy))


def in_trace() -> bool:
    """Whether the caller runs inside the body of an nnsight trace (a worker of nnsight's interleaver)."""
    try:
        from greenlet import getcurrent
    except ImportError:  # pragma: no cover - nnsight depends on greenlet
        return False
    return getattr(getcurrent(), "mediator", None) is not None


def check_not_in_trace(what: str = "encode") -> None:
    """A :class:`~tpsurgery.errors.TpsurgeryError` when called from the body of a user's nnsight trace."""
    if in_trace():
        raise TpsurgeryError(
            f"{what} cannot run inside the body of an nnsight `with model.trace(...)` block: a trace cannot be nested "
            "in another trace's body (nnsight fails with 'cyclic parent chain'). Call it before or after the block; "
            "inside `with model.session():` it works. To save or edit activations under the recipe, open the trace "
            "with the recipe in it instead: `with emb.trace(texts) as run:` (its body is yours; run.embeddings after "
            "the block; docs/backends.md, 'Inside your own trace')")


def check_copy(model: Any, envoy: Any = None) -> None:
    """A :class:`ModelError` when ``model`` (run by ``envoy``) carries anything a TransformerLens bridge booted from a
    copy of it cannot honour: nnsight edits do not travel to the copy, and hooks fire there around other modules."""
    found = carried(model, envoy)
    if found.any:
        raise ModelError(
            f"backend='transformer_lens' runs a TransformerLens bridge booted from a copy of the model, but the model "
            f"carries {found}: nnsight edits do not travel to the copy, and PyTorch hooks would fire there around "
            "other modules (or not at all). Use the nnsight backend (the default), which honours them, or remove "
            "them first")


def check(backend: Any) -> Carried:
    """What the model behind ``backend`` carries, for ``encode`` (:class:`tpsurgery.Embedder`): raises when called
    inside a user's nnsight trace, or when a TransformerLens bridge booted from a copy of a model cannot honour what
    that model carries (``backend.copied_from``: the ``(model, envoy)`` the copy was made from, :func:`check_copy`).
    """
    check_not_in_trace()
    source = getattr(backend, "copied_from", None)
    if source is not None:
        check_copy(*source)
    bridge = getattr(backend, "bridge", None)
    if bridge is not None:  # a bridge of the user's: its own hooks (TransformerLens add_hook, permanent) are honoured
        return carried(bridge)
    return carried(backend.model, getattr(backend, "_envoy", None))


def cache_bypass_message(found: Carried) -> str:
    """The warning given when the embedding cache is skipped for a model that carries ``found``."""
    return (f"the embedding cache is not used for this call: the model carries {found}, whose effect cannot be part "
            "of a cache key (a hook is code). Remove them, or pass embedding_cache=None to silence this warning")

