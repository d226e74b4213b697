"""Running out of memory gracefully: split a batch in halves and retry, down to one input.

>>> import torch
>>> from tpsurgery.resources import run_splitting
>>> def run(rows):  # pretend that more than two rows do not fit
...     if len(rows) > 2:
...         raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
...     return torch.tensor(rows, dtype=torch.float32)
>>> state = {}
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     run_splitting(run, [5, 3, 8, 1, 4], state).tolist()
[5.0, 3.0, 8.0, 1.0, 4.0]
>>> state["cap"], len(caught)          # later batches start at the size that fitted; one warning per call
(2, 1)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import BackendError, InputError, TpsurgeryError


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it wraps (``__cause__`` / ``__context__``) is an out-of-memory error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_memory() -> None:
    """Give cached accelerator memory back after an out-of-memory error (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


PENDING_BYTES = 2**26  # results an encode keeps on the accelerator between copies to the host


def flush_results(out: torch.Tensor, pending: list) -> None:
    """Write pending ``(indices, result)`` batches into ``out`` with one device-to-host copy; empties ``pending``.

    Copying each batch's result at once would make the host wait for the device after every batch.

    >>> out = torch.zeros(3, 2); pending = [([2], torch.ones(1, 2)), ([0], 2 * torch.ones(1, 2))]
    >>> flush_results(out, pending); out[:, 0].tolist(), pending
    ([2.0, 0.0, 1.0], [])
    """
    if pending:
        idx = [i for ids, _ in pending for i in ids]
        out[torch.tensor(idx)] = torch.cat([t.cpu() for _, t in pending])  # device_map models: any devices
        pending.clear()


def run_splitting(run: Callable[[list[int]], torch.Tensor], idx: Sequence[int], state: dict) -> torch.Tensor:
    """``run(idx)``; on out of memory, ``run`` each half and concatenate (rows keep their order).

    ``state`` lives for one ``encode`` call: ``state["cap"]`` is the largest batch that fitted after a split (later
    batches are cut to it up front), and the first split emits one warning. A single input that still does not fit
    raises :class:`BackendError` naming it (``index``: its position in ``idx``'s numbering).
    """
    idx = list(idx)
    cap = state.get("cap")
    if cap and len(idx) > cap:
        return torch.cat([run_splitting(run, idx[k: k + cap], state) for k in range(0, len(idx), cap)])
    try:
        return run(idx)
    except TpsurgeryError as exc:
        if not is_out_of_memory(exc):
            raise
        error = exc
    except Exception as exc:  # a backend that does not wrap its errors
        if not is_out_of_memory(exc):
            raise
        error = exc
    free_memory()
    if len(idx) == 1:
        raise BackendError(f"input {idx[0]}: out of memory even in a batch of one; shorten the text or use a "
                           f"smaller model / another device ({_reason(error)})", index=idx[0]) from error
    half = (len(idx) + 1) // 2
    state["cap"] = half
    if not state.get("warned"):
        state["warned"] = True
        warnings.warn(f"out of memory with a batch of {len(idx)}: retrying in batches of at most {half}",
                      UserWarning, stacklevel=4)
    return torch.cat([run_splitting(run, idx[:half], state), run_splitting(run, idx[half:], state)])


def _reason(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def check_texts(sentences: Any) -> list[str]:
    """The list of texts to embed; anything but an iterable of ``str`` is an :class:`InputError` naming the input.

    >>> check_texts(("a", "b"))
    ['a', 'b']
    >>> check_texts(["a", 3])
    Traceback (most recent call last):
    ...
    tpsurgery.errors.InputError: input 1: expected a str, got int
    """
    if isinstance(sentences, (bytes, dict)) or not hasattr(sentences, "__iter__"):
        raise InputError(None, f"sentences must be a str or a list of str, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(i, f"expected a str, got {type(t).__name__}")
    return texts


def caller_indices(rows, todo: Sequence[str], texts: Sequence[str]) -> list[int]:
    """Sorted first positions in the caller's ``texts`` of the de-duplicated ``todo[i]`` for ``i`` in ``rows``.

    >>> caller_indices({0, 1}, ["b", "a"], ["a", "b", "a"])
    [0, 1]
    """
    first = {t: i for i, t in reversed(list(enumerate(texts)))}
    return sorted(first[todo[i]] for i in rows)


def non_finite_rows(values: torch.Tensor) -> list[int]:
    """Rows (first axis) with a NaN or inf anywhere, or a vector (last axis) that is exactly zero: an overflow in
    the final norm (``x / sqrt(mean(x**2))`` with ``x**2`` infinite) gives all-zero embeddings, which have no direction
    and are as wrong as NaN.

    >>> non_finite_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [2.0, float("inf")], [0.0, 0.0]]))
    [1, 2, 3]
    """
    flat = values.reshape(len(values), -1)
    bad = ~torch.isfinite(flat).all(1)
    if values.dim() >= 2 and values.shape[-1] > 0:
        bad |= (values == 0).all(-1).reshape(len(values), -1).any(1)
    return bad.nonzero()[:, 0].tolist()


def at_user_index(exc: TpsurgeryError, done: Sequence[str], texts: Sequence[str]) -> TpsurgeryError:
    """``exc`` renumbered from the de-duplicated list ``done`` to the caller's ``texts`` (first occurrence)."""
    index = exc.index
    if index is None or not 0 <= index < len(done):
        return exc
    user = texts.index(done[index]) if isinstance(texts, list) else list(texts).index(done[index])
    return exc if user == index else renumbered(exc, user)


def renumbered(exc: TpsurgeryError, index: int, note: str = "") -> TpsurgeryError:
    """A copy of ``exc`` (which names an input) naming input ``index`` instead, ``note`` put before its text.
    Raise it ``from exc.__cause__`` (the error the original wrapped); ``exc`` itself becomes its context."""
    body = str(exc).split(": ", 1)[1] if str(exc).startswith(f"input {exc.index}: ") else str(exc)
    if isinstance(exc, InputError):
        return InputError(index, note + body)
    return BackendError(f"input {index}: {note}{body}", layer=exc.layer if isinstance(exc, BackendError) else None,
                        index=index)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout: embeddings are deterministic) and restore every module's flag after.

    >>> from tpsurgery.testing import tiny_model
    >>> m = tiny_model("gpt2")[0].train()
    >>> with eval_mode(m):
    ...     m.training
    False
    >>> m.training, all(x.training for x in m.modules())
    (True, True)
    """
    training = [mod for mod in model.modules() if mod.training] if isinstance(model, torch.nn.Module) else []
    try:
        for mod in training:
            mod.training = False
        yield
    finally:
        for mod in training:
            mod.training = True


def non_finite_message(indices: Sequence[int]) -> str:
    """The warning for embeddings that came out NaN or infinite (a float16 overflow, a broken model)."""
    shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
    return (f"the embeddings of {len(indices)} input(s) are not finite or all zero (NaN, inf, or an overflow in the "
            f"final norm; inputs {shown}): the model overflowed or is broken (a huge `scale` factor?); try float32 "
            "or bfloat16")


@contextlib.contextmanager
def no_library_bars() -> Iterator[None]:
    """Silence every tqdm bar started inside (model loading and GGUF conversion in transformers and
    huggingface_hub draw their own), then restore tqdm; for the CLI's ``--no-progress``.

    >>> from tqdm import tqdm
    >>> with no_library_bars():
    ...     tqdm(range(3)).disable
    True
    """
    import functools

    from tqdm import std

    init = std.tqdm.__init__
    std.tqdm.__init__ = functools.partialmethod(init, disable=True)  # callers that pass disable= still decide
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def peak_memory_mb(device: Any) -> float | None:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a CUDA device, else the process's peak resident
    set size (a high-water mark of the whole process, the model included); None where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
