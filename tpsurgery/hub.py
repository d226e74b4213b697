"""STS sets from the Hugging Face hub: MTEB's copies, at the revisions mteb pins (online only; never in tests).

``load_task(..., hub=True)`` / ``tpsurgery eval sts --hub`` fall back to these when no ``--data-dir`` holds the
SentEval file. They are not byte-identical to SentEval's files: STS-B there is the original cased text, SentEval's copy
is lower-cased and tokenized, so report numbers from one source only (results JSONs record which).

>>> import pytest; _ = pytest.importorskip("mteb")
>>> hub_dataset("stsb-dev")[0], hub_dataset("sts12")[2]
('mteb/stsbenchmark-sts', 'test')
>>> from datasets import Dataset
>>> rows = Dataset.from_dict({"sentence1": ["a  b", "c"], "sentence2": ["d", "e f"], "score": [4.0, 1.5]})
>>> p = pairs_from_rows("sts13", rows, origin="mteb/sts13-sts@7e90230a:test")
>>> p.a, p.gold.tolist(), p.origin
(('a b', 'c'), [4.0, 1.5], 'mteb/sts13-sts@7e90230a:test')
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .data import DataError, PairSet, tokens

# task -> (MTEB task name, split). SICK trial and the transfer tasks have no MTEB copy.
HUB_TASKS: dict[str, tuple[str, str]] = {
    "sts12": ("STS12", "test"), "sts13": ("STS13", "test"), "sts14": ("STS14", "test"), "sts15": ("STS15", "test"),
    "sts16": ("STS16", "test"), "stsb": ("STSBenchmark", "test"), "stsb-dev": ("STSBenchmark", "validation"),
    "stsb-train": ("STSBenchmark", "train"), "sickr": ("SICK-R", "test"),
}


def hub_dataset(task: str) -> tuple[str, str, str]:
    """``(dataset path, revision, split)`` of a task's hub copy, from mteb's task metadata (no network)."""
    if task not in HUB_TASKS:
        raise DataError(f"{task} has no Hugging Face hub copy here; hub tasks: {', '.join(HUB_TASKS)}")
    try:
        import mteb
    except ImportError as exc:
        raise DataError("the hub route reads dataset names and revisions from mteb: pip install 'tpsurgery[mteb]'") \
            from exc
    name, split = HUB_TASKS[task]
    ds = mteb.get_task(name).metadata.dataset
    return ds["path"], ds["revision"], split


def pairs_from_rows(task: str, rows: Any, limit: int | None = None, origin: str = "") -> PairSet:
    """A :class:`PairSet` from rows with ``sentence1``, ``sentence2``, ``score`` (MTEB's STS columns)."""
    missing = [c for c in ("sentence1", "sentence2", "score") if c not in rows.column_names]
    if missing:
        raise DataError(f"{task} ({origin or 'hub dataset'}): missing column(s) {', '.join(missing)}; "
                        f"has {', '.join(rows.column_names)}")
    n = len(rows) if limit is None else min(limit, len(rows))
    a = tuple(tokens(x) for x in rows["sentence1"][:n])
    b = tuple(tokens(x) for x in rows["sentence2"][:n])
    return PairSet(task, a, b, np.asarray(rows["score"][:n], dtype=np.float64), (origin,) * n, (), origin)


def load_hub(task: str, limit: int | None = None, load: Callable[..., Any] | None = None) -> PairSet:
    """Download (or read from the ``datasets`` cache) a task's hub copy; errors say how to work offline."""
    path, revision, split = hub_dataset(task)
    if load is None:
        try:
            from datasets import load_dataset as load
        except ImportError as exc:
            raise DataError("the hub route needs the `datasets` package (pip install 'tpsurgery[mteb]')") from exc
    origin = f"{path}@{revision}:{split}"
    try:
        rows = load(path, revision=revision, split=split)
    except Exception as exc:  # network, missing split, ... : one error family, the cause kept
        raise DataError(f"{task}: could not load {origin} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                        "offline, pass --data-dir with the SentEval files instead") from exc
    return pairs_from_rows(task, rows, limit, origin)
