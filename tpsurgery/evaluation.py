"""Evaluation: STS tasks (cosine, Spearman x100) and transfer tasks (logistic regression, accuracy x100).

Tasks are metadata (:data:`TASKS`); there is one STS evaluator and one transfer evaluator. Any object with
``encode(texts, batch_size=..., show_progress_bar=...) -> array`` can be evaluated, an :class:`~tpsurgery.Embedder`
or a sentence-transformers model alike.

>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama")
>>> emb = tpsurgery.apply(model, "prompt: 'This sentence : \\"{text}\\" means'\\nexit_layer: 2", tokenizer=tok)
>>> sets = [load_task("sts13", ["../shared/data/format-samples"])]
>>> scores = evaluate_sts(emb, sets)
>>> list(scores), -100.0 <= scores["sts13"] <= 100.0
(['sts13'], True)
>>> print(markdown_table([{"recipe": {"name": "r"}, "scores": {"sts13": 12.345}}], ["sts13"]))
| Method | STS13 | Avg. |
|---|---|---|
| r | 12.35 | 12.35 |
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from . import data as D
from .errors import InputError, import_extra

STS_TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
TRANSFER_TASKS = ("mr", "cr", "subj", "mpqa", "sst2", "trec", "mrpc")
SEED = 1111  # SentEval's seed for fold splits and classifiers


@dataclass(frozen=True)
class Task:
    """One benchmark: its kind, the column title in tables, and the loader ``load(data_dirs, limit)``."""

    name: str
    kind: Literal["sts", "transfer"]
    title: str
    load: Callable[..., Any]
    about: str


def _year(name):
    return lambda dirs, limit=None: D.load_sts_year(dirs, name, limit)


def _binary(name):
    return lambda dirs, limit=None: D.load_binary(dirs, name, limit)


TASKS: dict[str, Task] = {t.name: t for t in [
    *(Task(y, "sts", y.upper(), _year(y), f"{y.upper()} 'all' setting: sub-sets concatenated, one Spearman")
      for y in D.STS_YEARS),
    Task("stsb", "sts", "STS-B", lambda d, limit=None: D.load_stsb(d, "test", limit), "STS Benchmark test"),
    Task("stsb-dev", "sts", "STS-B dev", lambda d, limit=None: D.load_stsb(d, "dev", limit), "STS Benchmark dev"),
    Task("stsb-train", "sts", "STS-B train", lambda d, limit=None: D.load_stsb(d, "train", limit), "STS-B train"),
    Task("sickr", "sts", "SICK-R", lambda d, limit=None: D.load_sick(d, "test", limit), "SICK relatedness test"),
    Task("sickr-trial", "sts", "SICK-R trial", lambda d, limit=None: D.load_sick(d, "trial", limit), "SICK trial"),
    *(Task(b, "transfer", b.upper(), _binary(b), "binary sentiment/subjectivity, 10-fold CV (nested C search)")
      for b in D.BINARY_FILES),
    Task("sst2", "transfer", "SST2", D.load_sst2, "SST-2: C picked on dev, accuracy on test"),
    Task("trec", "transfer", "TREC", D.load_trec, "TREC-6: C picked by k-fold CV on train, accuracy on test"),
    Task("mrpc", "transfer", "MRPC", D.load_mrpc, "MRPC on [|u-v|, u*v]: C by k-fold CV on train, test accuracy"),
]}


def load_task(name: str, data_dirs: D.DataDirs, limit: int | None = None, spread: bool | str = False,
              hub: bool = False):
    """Load a task's data by name (see :data:`TASKS`); ``limit`` keeps the first pairs / lines per split, or with
    ``spread`` that many evenly spaced ones: ``True`` / ``"order"`` in file order (every sub-set / genre
    represented), ``"gold"`` over the gold-score range (:func:`tpsurgery.data.spread`).

    ``hub``: an STS set whose file no data folder holds comes from MTEB's Hugging Face hub copy (:mod:`tpsurgery.hub`).
    """
    if name not in TASKS:
        raise InputError(None, f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if spread and limit is None:
        raise InputError(None, "spread needs a limit: the number of evenly spaced pairs / lines to keep")
    first = None if spread else limit
    try:
        data = TASKS[name].load(data_dirs, limit=first)
    except D.DataNotFound as exc:
        from .hub import HUB_TASKS, load_hub

        if not hub:
            raise
        if name not in HUB_TASKS:
            raise D.DataNotFound(f"{exc}; {name} has no hub copy (hub tasks: {', '.join(HUB_TASKS)})") from exc
        data = load_hub(name, first)
    return D.spread(data, limit, by="order" if spread is True else spread) if spread else data


def encode_union(encoder: Any, texts: Sequence[str], batch_size: int = 32, progress: bool | None = None,
                 **kwargs: Any) -> tuple[np.ndarray, dict[str, int]]:
    """Embed the unique texts with ONE ``encode`` call; returns the array and ``text -> row``."""
    unique = list(dict.fromkeys(texts))
    out = encoder.encode(unique, batch_size=batch_size, show_progress_bar=progress, **kwargs)
    out = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out, dtype=np.float32)
    return out, {t: i for i, t in enumerate(unique)}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine over the last axis (any leading shape), float64; zero vectors give 0.

    >>> cosine(np.array([[1., 0.], [1., 1.]]), np.array([[2., 0.], [-1., -1.]])).round(6).tolist()
    [1.0, -1.0]
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def spearman100(pred: np.ndarray, gold: np.ndarray) -> np.ndarray | float:
    """Spearman correlation x100 of ``pred`` ([n] or [n, L]: one per column) with ``gold`` ([n]).

    >>> spearman100(np.array([0.1, 0.5, 0.3]), np.array([1.0, 3.0, 2.0]))
    100.0
    """
    import warnings

    spearmanr = import_extra("scipy.stats", "eval", "Spearman correlations (evaluations, sweeps)").spearmanr

    with warnings.catch_warnings():  # constant predictions (e.g. hidden_states[0] of the last token) give NaN
        warnings.simplefilter("ignore")
        if pred.ndim == 1:
            return float(100.0 * spearmanr(pred, gold).statistic)
        return np.array([100.0 * spearmanr(pred[:, j], gold).statistic for j in range(pred.shape[1])])


def evaluate_sts(encoder: Any, sets: Sequence[D.PairSet], batch_size: int = 32, progress: bool | None = None,
                 **encode_kwargs: Any) -> dict[str, Any]:
    """Spearman x100 of cosine vs gold for each set; all sets' unique sentences are embedded in ONE encode call.

    With ``all_layers=True`` (an Embedder), each score is an array over exit layers ``hidden_states[0..M]``.
    """
    return {name: spearman100(cos, s.gold) for (name, cos), s in
            zip(sts_cosines(encoder, sets, batch_size, progress, **encode_kwargs).items(), sets)}


def sts_cosines(encoder: Any, sets: Sequence[D.PairSet], batch_size: int = 32, progress: bool | None = None,
                **encode_kwargs: Any) -> dict[str, np.ndarray]:
    """The pair cosines of each set (``[n]``, or ``[n, L]`` with ``all_layers``), from ONE encode call."""
    texts = [t for s in sets for t in (*s.a, *s.b)]
    emb, row = encode_union(encoder, texts, batch_size, progress, **encode_kwargs)
    return {s.name: cosine(emb[[row[t] for t in s.a]], emb[[row[t] for t in s.b]]) for s in sets}


def kept_pairs(s: D.PairSet, cos: np.ndarray) -> dict[str, Any]:
    """What a results run keeps of an STS task: pair cosines (8 decimals), gold scores, and the pairs' hash."""
    from .stats import pairs_hash

    return {"n": len(s), "sha256": pairs_hash(s.a, s.b, s.gold), "gold": [float(g) for g in s.gold],
            "cosine": [round(float(c), 8) for c in cos]}


# -- transfer -----------------------------------------------------------------------------------------------------------
def _classifier(c: float, standardize: bool = True):
    import_extra("sklearn", "eval", "transfer evaluations")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=c, max_iter=2000, random_state=SEED)
    return make_pipeline(StandardScaler(), lr) if standardize else lr


def _fit_score(c, xtr, ytr, xte, yte, standardize: bool = True) -> float:
    return float(_classifier(c, standardize).fit(xtr, ytr).score(xte, yte))


def _cv_best(x, y, regs, kfold, n_jobs, standardize: bool = True) -> tuple[float, float]:
    """``(best C, its mean k-fold accuracy)`` on ``x, y`` (StratifiedKFold, SentEval's seed)."""
    import_extra("sklearn", "eval", "transfer evaluations")
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(n_splits=kfold, shuffle=True, random_state=SEED).split(x, y))
    accs = Parallel(n_jobs=n_jobs)(delayed(_fit_score)(c, x[tr], y[tr], x[te], y[te], standardize)
                                   for c in regs for tr, te in folds)
    means = np.array(accs).reshape(len(regs), len(folds)).mean(1)
    return regs[int(np.argmax(means))], float(means.max())


def classify(task: D.ClassificationSet, features: dict[str, np.ndarray], kfold: int = 10,
             n_jobs: int = 1, standardize: bool = True) -> dict[str, float]:
    """SentEval protocol on precomputed features: ``{"acc": test accuracy x100, "dev": selection accuracy x100}``.

    ``standardize`` (default): a StandardScaler fitted on each training part goes before the logistic regression (a
    deliberate deviation, docs/evaluation.md); ``False`` is SentEval's scikit-learn classifier on raw features.

    * only ``all`` (MR, CR, SUBJ, MPQA): k-fold CV; in each outer fold C in 2^-2..2^3 is chosen by inner k-fold CV.
    * ``train``/``dev``/``test`` (SST2): C in 2^-2..2^3 chosen on dev, trained on train, scored on test.
    * ``train``/``test`` (TREC, MRPC): C in 2^-1..2^5 chosen by k-fold CV on train, refit on train, scored on test.
    """
    import_extra("sklearn", "eval", "transfer evaluations")
    from sklearn.model_selection import StratifiedKFold

    y = {k: s.y for k, s in task.splits.items()}
    if "all" in features:
        x, yy = features["all"], y["all"]
        devs, tests = [], []
        regs = [2.0 ** t for t in range(-2, 4)]
        for tr, te in StratifiedKFold(n_splits=kfold, shuffle=True, random_state=SEED).split(x, yy):
            c, dev = _cv_best(x[tr], yy[tr], regs, kfold, n_jobs, standardize)
            devs.append(dev)
            tests.append(_fit_score(c, x[tr], yy[tr], x[te], yy[te], standardize))
        return {"acc": 100 * float(np.mean(tests)), "dev": 100 * float(np.mean(devs))}
    if "dev" in features:
        regs = [2.0 ** t for t in range(-2, 4)]
        devs = [_fit_score(c, features["train"], y["train"], features["dev"], y["dev"], standardize) for c in regs]
        c = regs[int(np.argmax(devs))]
        return {"acc": 100 * _fit_score(c, features["train"], y["train"], features["test"], y["test"], standardize),
                "dev": 100 * max(devs)}
    c, dev = _cv_best(features["train"], y["train"], [2.0 ** t for t in range(-1, 6)], kfold, n_jobs, standardize)
    return {"acc": 100 * _fit_score(c, features["train"], y["train"], features["test"], y["test"], standardize),
            "dev": 100 * dev}


def evaluate_transfer(encoder: Any, sets: Sequence[D.ClassificationSet], batch_size: int = 32,
                      progress: bool | None = None, kfold: int = 10, n_jobs: int = 1,
                      standardize: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy x100 per task; each task's unique sentences are embedded in one encode call.

    Pair tasks (MRPC) use SentEval's features ``[|u - v|, u * v]``.
    """
    out = {}
    for task in sets:
        texts = [t for s in task.splits.values() for t in s.texts()]
        emb, row = encode_union(encoder, texts, batch_size, progress)
        feats = {}
        for k, s in task.splits.items():
            u = emb[[row[t] for t in s.a]]
            if s.b is not None:
                v = emb[[row[t] for t in s.b]]
                u = np.concatenate([np.abs(u - v), u * v], axis=1)
            feats[k] = u
        out[task.name] = classify(task, feats, kfold=kfold, n_jobs=n_jobs, standardize=standardize)
    return out


# -- results ------------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers."""
    out = {}
    for pkg in ("tpsurgery", "torch", "transformers", "nnsight", "scikit-learn", "scipy", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def data_provenance(sets: Sequence[Any], limit: int | None, names: Sequence[str] | None = None,
                    spread: bool | str = False) -> dict[str, Any]:
    """Per task (``names``, default the sets' names): files read with SHA-256 prefixes, item count, ``limit``."""
    return {n: {"files": {str(p): D.file_hash(p) for p in s.files}, "n": len(s) if isinstance(s, D.PairSet)
                     else {k: len(v) for k, v in s.splits.items()}, "limit": limit, **({"spread": spread} if spread else {}),
                     **({"hub": s.origin} if getattr(s, "origin", "") else {})}
            for n, s in zip(names or [s.name for s in sets], sets)}


def run_record(model: str, recipe: Any, kind: str, scores: dict[str, float], sets: Sequence[Any],
               seconds: float, limit: int | None = None, details: dict | None = None,
               names: Sequence[str] | None = None, spread: bool | str = False,
               backend: str | None = None, pairs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One results entry: model, backend, recipe (name, hash, body), scores, data hashes, versions, seconds.

    ``pairs`` (STS tasks: :func:`kept_pairs`) are kept, and give each STS score and their average a bootstrap 95%
    interval (``uncertainty``; :func:`tpsurgery.stats.uncertainty`).
    """
    from .stats import uncertainty

    extra = {"uncertainty": uncertainty(pairs), "pairs": pairs} if pairs else {}
    return {
        "model": model,
        **({"backend": backend} if backend else {}),
        "recipe": {"name": recipe.name, "hash": recipe.hash(), "body": recipe.to_dict()},
        "kind": kind,
        "scores": {k: round(float(v), 4) for k, v in scores.items()},
        "details": details or {},
        "data": data_provenance(sets, limit, names, spread),
        "versions": versions(),
        "seconds": round(seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def evaluate(embedder: Any, tasks: Sequence[str], data_dirs: D.DataDirs, *, model_name: str | None = None,
             limit: int | None = None, batch_size: int = 32, progress: bool | None = None, kfold: int = 10,
             n_jobs: int = 1, spread: bool | str = False, hub: bool = False, standardize: bool = True) -> dict[str, Any]:
    """Load ``tasks`` (STS and/or transfer names), evaluate an :class:`~tpsurgery.Embedder`, return a run record.

    ``limit``: the first N pairs / lines per split; with ``spread``, N evenly spaced ones; ``hub``: STS sets missing
    from ``data_dirs`` come from the Hugging Face hub (see :func:`load_task`).
    """
    t0 = time.perf_counter()
    sets = [load_task(t, data_dirs, limit, spread, hub) for t in tasks]
    sts = [i for i, t in enumerate(tasks) if TASKS[t].kind == "sts"]
    transfer = [i for i, t in enumerate(tasks) if TASKS[t].kind == "transfer"]
    scores: dict[str, float] = {}
    details: dict[str, Any] = {}
    pairs: dict[str, Any] = {}
    if sts:
        cos = sts_cosines(embedder, [sets[i] for i in sts], batch_size, progress)
        for i in sts:
            scores[tasks[i]] = spearman100(cos[sets[i].name], sets[i].gold)
            pairs[tasks[i]] = kept_pairs(sets[i], cos[sets[i].name])
    if transfer:
        got_t = evaluate_transfer(embedder, [sets[i] for i in transfer], batch_size, progress, kfold, n_jobs,
                                  standardize)
        for i in transfer:
            res = got_t[sets[i].name]
            scores[tasks[i]], details[tasks[i]] = res["acc"], {"dev_acc": res["dev"], "kfold": kfold,
                                                                "standardize": standardize}
    kind = "sts" if not transfer else "transfer" if not sts else "mixed"
    name = model_name or getattr(embedder.model, "name_or_path", "") or type(embedder.model).__name__
    return run_record(name, embedder.recipe, kind, {t: scores[t] for t in tasks}, sets,
                      time.perf_counter() - t0, limit, details, names=list(tasks), spread=spread,
                      backend=embedder.backend.name, pairs=pairs)


def _atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` via a temporary file and rename: an interrupted run never leaves half a file (mode: umask)."""
    from .textio import atomic_write

    return atomic_write(path, text)


def write_results(path: str | os.PathLike, runs: Sequence[dict[str, Any]]) -> Path:
    """Write ``{"tpsurgery_results": 1, "runs": [...]}`` atomically."""
    return _atomic_write_text(path, json.dumps({"tpsurgery_results": 1, "runs": list(runs)}, indent=2) + "\n")


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The runs of a results JSON written by :func:`write_results` (a bare run object is accepted too)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise D.DataError(f"cannot read results {path}: {exc}") from None
    runs = obj.get("runs", [obj]) if isinstance(obj, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("scores"), dict) for r in runs):
        raise D.DataError(f"{path}: not a tpsurgery results file (expected {{'runs': [{{'scores': {{...}}}}, ...]}})")
    return runs


def markdown_table(runs: Sequence[dict[str, Any]], tasks: Sequence[str] | None = None) -> str:
    """A table like the paper's Table 1: one row per run, one column per task, and the average.

    A run with bootstrap intervals (``uncertainty``) shows each STS score as ``score [low, high]``; the average's
    interval is shown when the run's intervals cover exactly the table's tasks.

    >>> run = {"recipe": {"name": "r"}, "scores": {"stsb-dev": 70.0},
    ...        "uncertainty": {"tasks": {"stsb-dev": {"interval": [68.1, 71.9]}}, "average": {"interval": [68.1, 71.9]}}}
    >>> print(markdown_table([run]).splitlines()[-1])
    | r | 70.00 [68.1, 71.9] | 70.00 [68.1, 71.9] |
    """
    if tasks is None:
        tasks = list(dict.fromkeys(t for r in runs for t in r["scores"]))
    titles = [TASKS[t].title if t in TASKS else t for t in tasks]
    lines = ["| Method | " + " | ".join(titles) + " | Avg. |", "|---" * (len(tasks) + 2) + "|"]

    def cell(v, iv):
        return "-" if v is None else f"{v:.2f}" + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else "")

    for r in runs:
        unc = r.get("uncertainty") or {}
        ivs = {t: u.get("interval") for t, u in unc.get("tasks", {}).items()}
        vals = [r["scores"].get(t) for t in tasks]
        cells = [cell(v, ivs.get(t)) for t, v in zip(tasks, vals)]
        have = [v for v in vals if v is not None]
        avg_iv = unc.get("average", {}).get("interval") if set(ivs) == set(tasks) else None
        avg = cell(float(np.mean(have)), avg_iv) if have and len(have) == len(vals) else "-"
        lines.append(f"| {r['recipe'].get('name') or r['recipe'].get('hash', '?')} | " + " | ".join(cells)
                     + f" | {avg} |")
    limited = {t: d for r in runs for t, d in (r.get("data") or {}).items() if d.get("limit") is not None}
    if limited:  # a sample, not the whole set: say how many items each score saw
        lines.append("\nScored on a sample: " + "; ".join(
            f"{TASKS[t].title if t in TASKS else t}: {d['n']} items (--limit {d['limit']}"
            f"{', spread' if d.get('spread') else ''})" for t, d in limited.items()) + ".")
    return "\n".join(lines)
