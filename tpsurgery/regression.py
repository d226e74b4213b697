"""Regression checks: compare the scores of a results JSON with stored expected scores, within a tolerance.

Expected-scores files are small JSON documents, keyed by recipe name (a results run matches by ``recipe.name``, or
by recipe hash when the expected entry gives ``recipe_hash``)::

    {"tol": 0.5, "expected": {"smollm2-prompteol": {"scores": {"stsb-dev": 71.9}, "recipe_hash": "..."}}}

>>> run = {"recipe": {"name": "r", "hash": "h"}, "scores": {"stsb-dev": 70.0}}
>>> [c.status for c in compare([run], {"expected": {"r": {"scores": {"stsb-dev": 70.3}}}}, tol=0.5)]
['ok']
>>> checks = compare([run], {"expected": {"r": {"scores": {"stsb-dev": 71.0}}}}, tol=0.5)
>>> checks[0].status, failed(checks)
('regressed', True)
>>> print(report(checks))
recipe  task      expected     got    diff  status
r       stsb-dev     71.00   70.00   -1.00  regressed
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .data import DataError
from .errors import TpsurgeryError

DEFAULT_TOL = 0.5


@dataclass(frozen=True)
class Check:
    """One (recipe, task) comparison. ``status``: ok, regressed, improved (beyond tol), missing, mismatch (hash);
    ``note``: what a status needs said besides the numbers (both hashes of a mismatch)."""

    recipe: str
    task: str
    expected: float | None
    got: float | None
    status: str
    note: str = ""

    @property
    def diff(self) -> float | None:
        return None if self.expected is None or self.got is None else self.got - self.expected


def load_expected(path: str | os.PathLike) -> dict[str, Any]:
    """Read an expected-scores file (see the module docstring); a malformed one is a :class:`DataError` naming the
    entry (the CLI's exit code 2, never 1, which means a regression).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "e.json"; _ = p.write_text('{"expected": {"r": {"score": 1}}}')
    >>> load_expected(p)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tpsurgery.data.DataError: .../e.json: expected.r: needs "scores": {task: score} (got keys: score)
    """
    from .textio import read_bounded

    try:
        obj = json.loads(read_bounded(path, 16 << 20, "expected scores").decode("utf-8"))
    except (ValueError, TpsurgeryError) as exc:
        raise DataError(f"cannot read expected scores {path}: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("expected"), dict):
        raise DataError(f"{path}: expected {{'expected': {{recipe: {{'scores': {{task: score}}}}}}}}")
    tol = obj.get("tol", DEFAULT_TOL)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise DataError(f"{path}: tol must be a number >= 0 (got {tol!r})")
    for name, entry in obj["expected"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("scores"), dict):
            got = f"keys: {', '.join(map(str, entry))}" if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f'{path}: expected.{name}: needs "scores": {{task: score}} (got {got})')
        for task, score in entry["scores"].items():
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise DataError(f"{path}: expected.{name}.scores.{task}: a number or null (got {score!r})")
        if "recipe_hash" in entry and not isinstance(entry["recipe_hash"], str):
            raise DataError(f"{path}: expected.{name}.recipe_hash: a string (got {entry['recipe_hash']!r})")
    return obj


def expected_from_runs(runs: Sequence[dict[str, Any]], tol: float = DEFAULT_TOL, with_hash: bool = False,
                       **meta: Any) -> dict[str, Any]:
    """An expected-scores document built from results runs (to create or refresh a golden file).

    ``with_hash`` pins each recipe's hash too (a run of a changed recipe then fails as ``mismatch``; note that the hash
    also changes when a new recipe field with a default is added to tpsurgery).
    """
    def entry(r):
        return {"scores": r["scores"], "model": r.get("model"), **({"recipe_hash": r["recipe"]["hash"]} if with_hash else {})}

    return {"tol": tol, **meta, "expected": {r["recipe"]["name"] or r["recipe"]["hash"]: entry(r) for r in runs}}


def compare(runs: Sequence[dict[str, Any]], expected: dict[str, Any], tol: float | None = None,
            strict: bool = False, interval: bool = False) -> list[Check]:
    """Check every expected (recipe, task) score against the runs.

    A drop by more than ``tol`` is ``regressed``; a rise by more than ``tol`` is ``improved`` (a failure only when
    ``strict``: the golden file is then out of date, or the behaviour changed). ``tol`` defaults to the file's.
    ``interval``: where a run has a bootstrap interval for the task (:mod:`tpsurgery.stats`), the tolerance is the
    distance from its score to the interval's end (below for drops, above for rises) instead of ``tol``.

    >>> run = {"recipe": {"name": "r"}, "scores": {"t": 70.0}, "uncertainty": {"tasks": {"t": {"interval": [68.5, 71.0]}}}}
    >>> [c.status for c in compare([run], {"expected": {"r": {"scores": {"t": 71.4}}}}, tol=0.5, interval=True)]
    ['regressed']
    >>> [c.status for c in compare([run], {"expected": {"r": {"scores": {"t": 70.9}}}}, tol=0.5, interval=True)]
    ['ok']
    """
    tol = float(expected.get("tol", DEFAULT_TOL) if tol is None else tol)
    by_name = {r["recipe"].get("name"): r for r in runs}
    by_hash = {r["recipe"].get("hash"): r for r in runs}
    checks = []
    for name, entry in expected["expected"].items():
        want_hash = entry.get("recipe_hash")
        run = by_name.get(name) or (by_hash.get(want_hash) if want_hash else None) or by_hash.get(name)
        if run is not None and want_hash and run["recipe"].get("hash") != want_hash:  # said, and scores still checked
            checks.append(Check(name, "<recipe hash>", None, None, "mismatch",
                                f"{name}: the recipe hash is {run['recipe'].get('hash')}, expected {want_hash} (the "
                                "recipe changed, or tpsurgery added a recipe field)"))
        for task, want in entry["scores"].items():
            got = None if run is None else run["scores"].get(task)
            iv = run.get("uncertainty", {}).get("tasks", {}).get(task, {}).get("interval") if interval and run else None
            down, up = (got - iv[0], iv[1] - got) if iv and got is not None else (tol, tol)
            if got is None or want is None or math.isnan(got):
                checks.append(Check(name, task, want, got, "missing"))
            elif got < want - up:  # the expected score lies above the run's interval
                checks.append(Check(name, task, want, got, "regressed"))
            elif got > want + down:
                checks.append(Check(name, task, want, got, "improved" + (" (strict)" if strict else "")))
            else:
                checks.append(Check(name, task, want, got, "ok"))
    return checks


def failed(checks: Sequence[Check]) -> bool:
    """Whether any check is a failure (anything but ``ok`` and non-strict ``improved``)."""
    return any(c.status not in ("ok", "improved") for c in checks)


def report(checks: Sequence[Check]) -> str:
    """A plain-text table of the checks."""
    w1 = max([len("recipe")] + [len(c.recipe) for c in checks])
    w2 = max([len("task")] + [len(c.task) for c in checks])

    def num(x):
        return f"{x:8.2f}" if x is not None else "       -"

    lines = [f"{'recipe':<{w1}}  {'task':<{w2}}  expected     got    diff  status"]
    for c in checks:
        lines.append(f"{c.recipe:<{w1}}  {c.task:<{w2}}  {num(c.expected)}{num(c.got)}{num(c.diff)}  {c.status}")
    lines += [c.note for c in checks if c.note]
    return "\n".join(lines)


def assert_no_regression(results: str | os.PathLike | Sequence[dict[str, Any]], expected: str | os.PathLike | dict,
                         tol: float | None = None, strict: bool = False) -> list[Check]:
    """Pytest helper: raise ``AssertionError`` with the report when a score regressed (or changed, ``strict``).

    ``results``: a results JSON path or runs; ``expected``: an expected-scores path or document.
    """
    from .evaluation import read_results

    runs = read_results(results) if isinstance(results, (str, os.PathLike)) else list(results)
    exp = load_expected(expected) if isinstance(expected, (str, os.PathLike)) else expected
    checks = compare(runs, exp, tol, strict)
    if failed(checks):
        raise AssertionError("score regression:\n" + report(checks))
    return checks
