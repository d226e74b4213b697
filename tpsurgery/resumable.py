"""Evaluations that keep their work: each finished task goes into the results JSON at once, and a rerun skips it.

:func:`evaluate_into` evaluates one recipe task by task. After every task the run (scores, data provenance, pairs,
bootstrap intervals) is merged into the results file and the file is replaced atomically, so a killed run loses at
most the task in progress. A rerun with the same *key* (model name and weights fingerprint, backend, recipe hash,
limit, spread mode, k-fold and standardisation, and :func:`tpsurgery.buildinfo.build_info`: tpsurgery's code and the
library versions, so a code change is never hidden by a kept score) finds the run and skips each task whose stored data provenance (files and
their SHA-256, item count) equals the data loaded now; any other run in the file is kept as it is (``tpsurgery eval``
rewrites the file with just its own runs once every recipe is done).

>>> import tpsurgery, tempfile, pathlib
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=3)
>>> emb = tpsurgery.apply(model, "prompt: 'This : {text} means'\\nexit_layer: 2", tokenizer=tok)
>>> out = pathlib.Path(tempfile.mkdtemp()) / "r.json"
>>> run, done = evaluate_into(out, emb, ["sts13", "sts15"], ["../shared/data/format-samples"], model_name="tiny")
>>> sorted(run["scores"]), done
(['sts13', 'sts15'], [])
>>> run2, done = evaluate_into(out, emb, ["sts13", "sts15"], ["../shared/data/format-samples"], model_name="tiny")
>>> done, run2["scores"] == run["scores"]
(['sts13', 'sts15'], True)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from . import data as D
from .buildinfo import build_info
from .cache import model_fingerprint
from .errors import InputError
from .evaluation import TASKS, data_provenance, evaluate, load_task, read_results, write_results


def run_key(model_name: str, embedder: Any, limit: int | None, spread: bool | str, kfold: int,
            standardize: bool) -> str:
    """What makes two runs the same run (16 hex digits); stored as ``resume_key``."""
    fields = [model_name, model_fingerprint(embedder.model), embedder.backend.name, embedder.recipe.hash(), limit,
              spread or False, kfold, standardize, build_info()]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def _merge(run: dict[str, Any] | None, new: dict[str, Any], key: str) -> dict[str, Any]:
    """``run`` with ``new``'s single task added; intervals recomputed over every kept STS task."""
    from .stats import uncertainty

    if run is None:
        return {**new, "resume_key": key}
    out = json.loads(json.dumps(run))
    for part in ("scores", "details", "data", "pairs"):
        if new.get(part):
            out.setdefault(part, {}).update(new[part])
    out["seconds"] = round(out.get("seconds", 0.0) + new["seconds"], 3)
    out["versions"], out["created"] = new["versions"], new["created"]
    kinds = {TASKS[t].kind for t in out["scores"] if t in TASKS}
    out["kind"] = "mixed" if len(kinds) > 1 else next(iter(kinds), out["kind"])
    if out.get("pairs"):
        out["uncertainty"] = uncertainty(out["pairs"])
    return out


def evaluate_into(output: str | os.PathLike, embedder: Any, tasks: Sequence[str], data_dirs: D.DataDirs, *,
                  model_name: str, limit: int | None = None, spread: bool | str = False, hub: bool = False,
                  kfold: int = 10, standardize: bool = True, log: Callable[[str], None] | None = None,
                  keep: bool = True, **evaluate_kw: Any) -> tuple[dict[str, Any], list[str]]:
    """Evaluate ``tasks`` one at a time into ``output`` (see the module docstring): ``(the run, tasks skipped)``.

    The run's scores follow ``tasks``' order; ``evaluate_kw`` go to :func:`tpsurgery.evaluation.evaluate`.
    ``keep=False`` recomputes every task (still writing each as it finishes).
    """
    if not tasks:
        raise InputError(None, "no task to evaluate")
    output = Path(output)
    key = run_key(model_name, embedder, limit, spread, kfold, standardize)
    runs = read_results(output) if output.is_file() else []
    at = next((i for i, r in enumerate(runs) if r.get("resume_key") == key), None)
    run = runs[at] if at is not None else None
    skipped = []
    for task in tasks:
        if keep and run is not None and task in run.get("scores", {}):
            data = load_task(task, data_dirs, limit, spread, hub)
            if data_provenance([data], limit, [task], spread)[task] == run.get("data", {}).get(task):
                skipped.append(task)
                if log:
                    log(f"{task}: kept from {output} (same recipe, model and data)")
                continue
        new = evaluate(embedder, [task], data_dirs, model_name=model_name, limit=limit, spread=spread, hub=hub,
                       kfold=kfold, standardize=standardize, **evaluate_kw)
        run = _merge(run, new, key)
        if at is None:
            runs.append(run)
            at = len(runs) - 1
        runs[at] = run
        write_results(output, runs)
    run = {**run, "scores": {t: run["scores"][t] for t in tasks}}
    return run, skipped
