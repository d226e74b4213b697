"""Uncertainty of STS scores: bootstrap 95% intervals over pairs, and paired-bootstrap differences of two recipes.

An STS score is Spearman x100 of the pair cosines against the gold scores of *these* pairs; another sample of pairs
from the same source would give another score. The bootstrap resamples the pairs of a task with replacement
(:data:`RESAMPLES` times, seed :data:`SEED`), recomputes Spearman x100 on each resample and reports the 2.5th and
97.5th percentiles (a percentile interval). The resampled indices depend only on the seed, the task name and the
number of pairs, so

* two recipes scored on the same pairs get the *same* resamples: the paired difference (:func:`paired_difference`)
  cancels the part of the noise that both share (which pairs happen to be easy), and is much tighter than the two
  intervals side by side;
* the average over tasks uses replicate ``b`` of every task together (tasks are resampled independently).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> gold = rng.uniform(0, 5, 200)
>>> cos = gold + rng.normal(0, 2, 200)
>>> score = spearman(cos, gold)
>>> lo, hi = interval(bootstrap(cos, gold, "t"))
>>> lo < score < hi, round(hi - lo, 1)
(True, 18.3)
>>> d = paired_difference(cos, cos + rng.normal(0, 0.5, 200), gold, "t")
>>> d["interval"][0] < d["diff"] < d["interval"][1]
True
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

RESAMPLES = 1000  # bootstrap replicates per task (percentile interval)
SEED = 1111  # fixed: every run with the same pairs draws the same resamples
LEVEL = 0.95
_CHUNK = 200  # replicates ranked at once (memory: _CHUNK x pairs floats)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank, as scipy's spearmanr)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman correlation x100 (the score of :func:`tpsurgery.evaluation.spearman100`).

    >>> spearman([0.1, 0.5, 0.3], [1.0, 3.0, 2.0])
    100.0
    """
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    return float(100.0 * _pearson_rows(_ranks(p), _ranks(g)))


def resample_indices(task: str, n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` pair indices drawn with replacement; a function of (seed, task name, n) only.

    >>> resample_indices("stsb-dev", 5, 2).tolist() == resample_indices("stsb-dev", 5, 2).tolist()
    True
    """
    if n < 2:
        raise InputError(None, f"task {task!r}: a bootstrap needs at least 2 pairs, got {n}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), n])
    return rng.integers(0, n, size=(resamples, n))


def bootstrap(pred: Sequence[float], gold: Sequence[float], task: str, resamples: int = RESAMPLES,
              seed: int = SEED) -> np.ndarray:
    """Spearman x100 on each of ``resamples`` resamples of the pairs (NaN where a resample is constant)."""
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if p.shape != g.shape or p.ndim != 1:
        raise InputError(None, f"task {task!r}: {p.shape} predictions for {g.shape} gold scores")
    idx = resample_indices(task, len(p), resamples, seed)
    out = np.empty(resamples)
    for s in range(0, resamples, _CHUNK):
        i = idx[s:s + _CHUNK]
        out[s:s + _CHUNK] = 100.0 * _pearson_rows(_ranks(p[i]), _ranks(g[i]))
    return out


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN replicates dropped), rounded to 4 decimals."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if not len(r):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(r, [tail, 100 - tail])
    return round(float(lo), 4), round(float(hi), 4)


def pairs_hash(a: Sequence[str], b: Sequence[str], gold: Sequence[float]) -> str:
    """SHA-256 (16 hex digits) of a task's pairs and gold scores, in order: two runs are paired only if equal.

    >>> pairs_hash(["x"], ["y"], [1.0]) == pairs_hash(["x"], ["y"], [1]), pairs_hash(["x"], ["y"], [1.0]) == pairs_hash(["y"], ["x"], [1.0])
    (True, False)
    """
    body = json.dumps([list(a), list(b), [float(g) for g in gold]], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def uncertainty(pairs: Mapping[str, Mapping[str, Any]], resamples: int = RESAMPLES, seed: int = SEED,
                level: float = LEVEL) -> dict[str, Any]:
    """Intervals per task and for the average, from ``{task: {"cosine": [...], "gold": [...]}}`` (a run's ``pairs``).

    >>> u = uncertainty({"a": {"cosine": [.1, .4, .2, .9], "gold": [1, 2, 3, 4]}}, resamples=50)
    >>> sorted(u), u["method"], len(u["tasks"]["a"]["interval"])
    (['average', 'level', 'method', 'resamples', 'seed', 'tasks'], 'percentile bootstrap over pairs', 2)
    """
    reps = {t: bootstrap(p["cosine"], p["gold"], t, resamples, seed) for t, p in pairs.items()}
    out: dict[str, Any] = {"method": "percentile bootstrap over pairs", "resamples": resamples, "seed": seed,
                           "level": level, "tasks": {t: {"interval": list(interval(r, level))} for t, r in reps.items()}}
    if reps:
        scores = [spearman(p["cosine"], p["gold"]) for p in pairs.values()]
        out["average"] = {"score": round(float(np.mean(scores)), 4),
                          "interval": list(interval(np.mean(np.stack(list(reps.values())), axis=0), level))}
    return out


def paired_difference(pred_a: Sequence[float], pred_b: Sequence[float], gold: Sequence[float], task: str,
                      resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """``B - A`` in Spearman x100 on the same pairs, with its paired-bootstrap interval (same resample for both)."""
    ra = bootstrap(pred_a, gold, task, resamples, seed)
    rb = bootstrap(pred_b, gold, task, resamples, seed)
    diff = spearman(pred_b, gold) - spearman(pred_a, gold)
    return {"diff": round(diff, 4), "interval": list(interval(rb - ra, level)), "replicates": rb - ra}


def compare_runs(run_a: Mapping[str, Any], run_b: Mapping[str, Any], resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = LEVEL) -> list[dict[str, Any]]:
    """Per shared task (and the average of them): A's and B's scores, ``B - A`` and its paired 95% interval.

    Both runs must keep their pairs (results written by tpsurgery >= issue 25 do); pairs are matched by task and
    index, and a task whose pair hash or gold scores differ between the runs is refused (the difference would not be
    paired).
    """
    name_a, name_b = _run_name(run_a), _run_name(run_b)
    pa, pb = run_a.get("pairs"), run_b.get("pairs")
    for run, p, name in ((run_a, pa, name_a), (run_b, pb, name_b)):
        if not isinstance(p, dict) or not p:
            raise InputError(None, f"run {name!r} keeps no per-pair cosines (`pairs`); rerun `tpsurgery eval sts` "
                                   "with this version to get them")
    shared = [t for t in pa if t in pb]
    if not shared:
        raise InputError(None, f"runs {name_a!r} and {name_b!r} share no STS task (A: {', '.join(pa)}; "
                               f"B: {', '.join(pb)})")
    rows, reps = [], []
    for t in shared:
        a, b = pa[t], pb[t]
        if a.get("sha256") != b.get("sha256") or list(a["gold"]) != list(b["gold"]):
            raise InputError(None, f"task {t!r}: the two runs were scored on different pairs (pair hashes "
                                   f"{a.get('sha256')} vs {b.get('sha256')}, {len(a['gold'])} vs {len(b['gold'])} "
                                   "pairs); a paired comparison needs the same pairs in the same order")
        d = paired_difference(a["cosine"], b["cosine"], a["gold"], t, resamples, seed, level)
        reps.append(d.pop("replicates"))
        rows.append({"task": t, "n": len(a["gold"]), "a": round(spearman(a["cosine"], a["gold"]), 4),
                     "b": round(spearman(b["cosine"], b["gold"]), 4), **d})
    if len(rows) > 1:
        rows.append({"task": "average", "n": sum(r["n"] for r in rows),
                     "a": round(float(np.mean([r["a"] for r in rows])), 4),
                     "b": round(float(np.mean([r["b"] for r in rows])), 4),
                     "diff": round(float(np.mean([r["diff"] for r in rows])), 4),
                     "interval": list(interval(np.mean(np.stack(reps), axis=0), level))})
    return rows


def _run_name(run: Mapping[str, Any]) -> str:
    rec = run.get("recipe", {})
    return rec.get("name") or rec.get("hash", "?")


def compare_table(rows: Sequence[Mapping[str, Any]], name_a: str, name_b: str) -> str:
    """Markdown table of :func:`compare_runs`; ``*`` marks a difference whose interval excludes 0.

    >>> print(compare_table([{"task": "stsb-dev", "n": 9, "a": 70.0, "b": 71.5, "diff": 1.5, "interval": [0.2, 2.9]}],
    ...                     "x", "y"))
    | task | pairs | A: x | B: y | B - A | 95% interval |
    |---|---|---|---|---|---|
    | stsb-dev | 9 | 70.00 | 71.50 | +1.50 * | [+0.20, +2.90] |
    """
    lines = [f"| task | pairs | A: {name_a} | B: {name_b} | B - A | {int(LEVEL * 100)}% interval |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["interval"]
        mark = " *" if lo > 0 or hi < 0 else ""
        lines.append(f"| {r['task']} | {r['n']} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f}{mark} | "
                     f"[{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)


def half_width(run: Mapping[str, Any], task: str) -> float | None:
    """Half the width of a run's stored interval for ``task`` (None when the run has none)."""
    iv = run.get("uncertainty", {}).get("tasks", {}).get(task, {}).get("interval")
    return None if not iv else (iv[1] - iv[0]) / 2
