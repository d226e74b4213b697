"""Batches by a token budget, the progress bar they move, and the work counters (:class:`EncodeStats`).

A batch holds at most ``batch_size`` rows and at most ``max_tokens`` computed positions (rows x the width of its
longest row, pads included). Rows are taken longest first, so one very long text runs alone (or with a few) instead
of padding a whole batch of short ones to its length. The default budget is ``batch_size`` x twice the median row
length of the call: ordinary texts fill whole batches as before; only outliers get smaller ones.

>>> token_batches([3, 9, 2, 3, 40], batch_size=2, max_tokens=12)
[[4], [1], [0, 3], [2]]
>>> token_batches([5, 5, 4, 5], batch_size=3, max_tokens=None, exact_length=True)
[[0, 1, 3], [2]]
>>> default_budget([3, 3, 4, 50], batch_size=8)
48
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .errors import InputError
from .resources import peak_memory_mb


def default_budget(lengths: Sequence[int], batch_size: int) -> int:
    """``batch_size`` x twice the median length: the token budget when the caller gives none."""
    return batch_size * 2 * max(1, int(statistics.median(lengths))) if lengths else batch_size


def check_budget(batch_size: Any, max_tokens: Any) -> None:
    """``InputError`` for a batch size or token budget that is not a positive integer."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(None, f"batch_size must be a positive integer, got {batch_size!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InputError(None, f"max_tokens must be a positive integer or None, got {max_tokens!r}")


def token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                  exact_length: bool = False) -> list[list[int]]:
    """Index groups, longest rows first: each at most ``batch_size`` rows and ``max_tokens`` padded positions (a row
    longer than the budget runs alone). ``exact_length``: a group holds rows of one length only (no pads)."""
    budget = max_tokens or default_budget(lengths, batch_size)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    runs = [order]
    if exact_length:
        buckets: dict[int, list[int]] = {}
        for i in order:
            buckets.setdefault(lengths[i], []).append(i)
        runs = list(buckets.values())
    groups: list[list[int]] = []
    for run in runs:
        group: list[int] = []
        for i in run:
            if group and (len(group) >= batch_size or (len(group) + 1) * lengths[group[0]] > budget):
                groups.append(group)
                group = []
            group.append(i)
        if group:
            groups.append(group)
    return groups


PROGRESS_DELAY_S = 3.0


class Progress:
    """A progress bar over ``total`` texts that ``encode`` advances as batches finish, or none.

    ``show``: ``None`` (the library default: a bar that appears only once the run has lasted ``PROGRESS_DELAY_S``
    seconds, so quick calls print nothing), ``True`` (a bar at once), ``False`` (nothing), or a bar made by the
    caller (anything with ``update(n)``, e.g. ``tqdm``) that spans several calls; ``share`` is the part of a text one
    pass is worth (1/T for T templates, so the bar ends at the number of texts, not T times it). Notebook widgets
    when ipywidgets is installed, text on stderr otherwise.

    >>> p = Progress(False, 3); p.advance(2); p.close()
    >>> p = Progress(None, 3); p.advance(1); p.bar is None    # a quick call: no tqdm is even made
    True
    """

    def __init__(self, show: Any, total: int, share: float = 1.0, desc: str = "encode", unit: str = "text"):
        self.share = share
        self.owned = (show is None or bool(show)) and not hasattr(show, "update")
        self.bar: Any = show if hasattr(show, "update") else None
        self._spec = (total, desc, unit)
        self._delay = PROGRESS_DELAY_S if show is None else 0.0
        self._t0 = time.perf_counter()
        self._wall0 = time.time()  # tqdm's clock: a bar opened late counts its time and rate from here
        self._done: float = 0  # an int while whole texts are counted: tqdm prints "7/7", not "7.0/7"
        if self.owned and self._delay <= 0:
            self._open()

    def _open(self) -> None:
        """The bar itself, made only once it is shown: a quick call builds no tqdm (~50 us and a monitor thread)."""
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bars need it; without it they raise)
            from tqdm.auto import tqdm
        except ImportError:
            from tqdm import tqdm

        total, desc, unit = self._spec
        if not self._done:
            self.bar = tqdm(total=total, desc=desc, unit=unit)
            return
        # Opened late, with work done: the bar starts at the run's true start, so its elapsed time, rate and ETA are
        # right at once (not "?text/s"); `delay` keeps tqdm from drawing it at 0 first. A run already finished is
        # drawn once, by close(); otherwise now, and then as it moves.
        bar = tqdm(total=total, desc=desc, unit=unit, delay=1e-9)
        bar.n = bar.last_print_n = self._done
        bar.start_t, bar.last_print_t = self._wall0, bar._time()
        if self._done < total:
            bar.refresh()
        self.bar = bar

    def advance(self, n: int, whole: bool = False) -> None:
        """``n`` rows of one pass done (``whole``: ``n`` texts done outright, e.g. found in the cache)."""
        if not n:
            return
        step = n if whole or self.share == 1 else n * self.share
        if self.bar is None and self.owned:
            self._done += step
            if time.perf_counter() - self._t0 >= self._delay:
                self._open()
        elif self.bar is not None:
            self.bar.update(step)

    def close(self) -> None:
        if self.owned and self.bar is not None:
            self.bar.close()


@dataclass
class EncodeStats:
    """Work counters since the embedder was made: calls, texts, batches, rows, padded vs real tokens, prefix tokens
    not recomputed, wall time and peak memory; ``print(emb.stats)`` for a summary.

    >>> s = EncodeStats(); s.count(rows=2, width=4, real=6); s.padding_waste
    0.25
    >>> s.seconds, s.texts = 2.0, 2; print(s)
    2 texts in 2.00 s (1.0 texts/s, 3 tokens/s); 1 batches, 25% padding
    """

    batches: int = 0
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    prefix_tokens_saved: int = 0
    texts: int = 0
    seconds: float = 0.0
    peak_memory_mb: float | None = None

    def count(self, rows: int, width: int, real: int) -> None:
        self.batches += 1
        self.rows += rows
        self.tokens += real
        self.padded_tokens += rows * width

    @property
    def padding_waste(self) -> float:
        """Share of the computed positions that are pads (0.0 = no padding)."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def texts_per_second(self) -> float:
        """Texts given to ``encode`` / ``encode_schedules`` per second of their wall time."""
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Real (non-pad) tokens run per second of wall time."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        mem = f"; peak memory {self.peak_memory_mb:.0f} MiB" if self.peak_memory_mb is not None else ""
        return (f"{self.texts} texts in {self.seconds:.2f} s ({self.texts_per_second:.1f} texts/s, "
                f"{self.tokens_per_second:.0f} tokens/s); {self.batches} batches, {self.padding_waste:.0%} padding"
                + mem)


@contextlib.contextmanager
def timed(stats: EncodeStats, sentences: Any, device: Any) -> Iterator[None]:
    """Adds a call's wall time, its number of texts and the peak memory so far to ``stats``. A context manager, not a
    decorator: a wrapper would be one more frame between ``encode``'s warnings and the caller's line."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stats.seconds += time.perf_counter() - t0
        sized = isinstance(sentences, str) or hasattr(sentences, "__len__")
        stats.texts += (1 if isinstance(sentences, str) else len(sentences)) if sized else 0
        stats.peak_memory_mb = peak_memory_mb(device)
