"""Exit-layer sweeps: STS-B dev Spearman over a grid of TP schedules x every exit layer M, and ``exit_layer: auto``.

For each TP schedule (start, stop, alpha) ONE all-layer pass gives the score at every exit layer: TP before layer i only
changes ``hidden_states[j]`` for j > i, so the pass with the full schedule reads every ``hidden_states[M]`` exactly as a
run of that recipe with ``exit_layer: M`` would. The sweep result is stored in the cache under the model's fingerprint
and the recipe's hash with TP and exit layer removed; ``exit_layer: auto`` looks the recipe's own TP row up there
(:mod:`tpsurgery.sweep_store`).

>>> import tpsurgery
>>> from tpsurgery.data import load_stsb
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=3)
>>> pairs = load_stsb(["../shared/data/format-samples"], "test")
>>> res = run_sweep(model, 'prompt: "This : <PST> {text} means"', pairs, stops=[2, 3], tokenizer=tok)
>>> [row["label"] for row in res.rows], len(res.rows[0]["scores"])      # scores for hidden_states[0..3]
(['no TP (placeholder hidden)', 'TP [1,2)', 'TP [1,3)'], 4)
>>> res.rows[1]["scores"][1:3] == res.rows[2]["scores"][1:3]          # TP at layers >= M cannot change M
True
>>> res.rows[0]["scores"][0] is None    # M=0: the last token's embedding row is the same for every sentence
True
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .api import apply, as_recipe
from .backends import ResumableBackend
from .batching import Progress
from .buildinfo import build_info
from .cache import model_fingerprint  # exact (every weight), memoized; also keys the embedding cache
from .errors import InputError, TpsurgeryError
from .evaluation import _atomic_write_text, cosine, spearman100
from .plan import compile_plan
from .plots import agg_figure
from .resources import renumbered
from .recipe import PLACEHOLDER_MARKER, Recipe, dump_recipe
from .sharing import encode_schedules, layer_runs, share_groups
from .sweep_store import base_recipe, pairs_digest, sweep_path


@dataclass(frozen=True)
class Best:
    """The best cell of a sweep: row ``label`` (its ``tp`` schedule), exit layer M (a ``hidden_states`` index: 0 =
    embedding output, M = output of decoder layer M-1), Spearman x100 ``score``; ``row`` indexes ``rows``."""

    label: str
    exit_layer: int
    score: float
    row: int
    tp: dict

    def __str__(self) -> str:
        return f"{self.label}, exit hidden_states[{self.exit_layer}] -> {self.score:.2f}"


@dataclass
class SweepResult:
    """All scores of a sweep: ``rows[r]["scores"][M]`` is the Spearman x100 at ``hidden_states[M]`` for TP row r."""

    model: str
    fingerprint: str
    recipe: Recipe
    task: str
    n_pairs: int
    n_layers: int
    rows: list[dict[str, Any]]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # digest of the scored pairs (:func:`~tpsurgery.sweep_store.pairs_digest`): keys the stored sweep

    def best(self) -> "Best":
        """The best cell, labelled (ties: the earliest row, then the smallest M)."""
        grid = np.array([r["scores"] for r in self.rows], dtype=np.float64)
        r, m = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
        return Best(self.rows[int(r)]["label"], int(m), float(grid[r, m]), int(r), self.rows[int(r)]["tp"])

    def curve(self, label: str) -> list[float | None]:
        """Spearman x100 at each exit layer M = 0..n_layers of the row labelled ``label``."""
        for row in self.rows:
            if row["label"] == label:
                return row["scores"]
        raise InputError(None, f"no sweep row labelled {label!r}; rows: {', '.join(r['label'] for r in self.rows)}")

    def row_recipe(self, row: int, exit_layer: int) -> Recipe:
        """The recipe that computes cell (``row``, ``exit_layer``) exactly: the row's TP schedule, its placeholder
        (the 'no TP' baseline hides the placeholder: ``placeholder.mask: all``) and the exit as ``hidden_states``
        index."""
        changes: dict[str, Any] = {"tp": self.rows[row]["tp"], "exit_layer": exit_layer}
        mask = self.rows[row].get("placeholder_mask")
        if mask is not None:
            changes["placeholder"] = {**self.recipe.placeholder.model_dump(mode="json"), "mask": mask}
        return self.recipe.replace(**changes)

    def best_recipe(self) -> Recipe:
        """The swept recipe that recreates the best cell exactly (:meth:`row_recipe`), named and described."""
        b = self.best()
        name = (self.recipe.name or "recipe") + "-swept"
        desc = (f"{self.recipe.description} Sweep on {self.task} ({self.n_pairs} pairs, {self.model}): "
                f"{b.label}, exit hidden_states[{b.exit_layer}] -> {b.score:.2f}").strip()
        return self.row_recipe(b.row, b.exit_layer).replace(name=name, description=desc)

    def to_dict(self) -> dict[str, Any]:
        r, m, score = (b := self.best()).row, b.exit_layer, b.score
        return {"tpsurgery_sweep": 1, "model": self.model, "fingerprint": self.fingerprint, "build": build_info(),
                "recipe": self.recipe.to_dict(), "recipe_hash": base_recipe(self.recipe).hash(), "task": self.task,
                "n_pairs": self.n_pairs, "data": self.data, "n_layers": self.n_layers, "rows": self.rows,
                "best": {"row": r, "label": self.rows[r]["label"], "exit_layer": m, "score": score},
                "seconds": round(self.seconds, 3), **self.extra}

    def heatmap(self, path: str | os.PathLike) -> Path:
        """Write a heatmap PNG (rows: TP schedules, columns: exit layer M; the best cell boxed). Agg, no GUI."""
        grid = np.array([r["scores"] for r in self.rows], dtype=np.float64)
        fig = agg_figure(max(6.0, 0.32 * grid.shape[1] + 2.5), max(2.5, 0.4 * grid.shape[0] + 1.5), "sweep heatmaps")
        from matplotlib.patches import Rectangle

        ax = fig.add_subplot()
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(self.rows)), [r["label"] for r in self.rows])
        ax.set_xticks(range(grid.shape[1]), [str(m) for m in range(grid.shape[1])], fontsize=7)
        ax.set_xlabel("exit layer M (hidden_states[M])")
        r, m, score = (b := self.best()).row, b.exit_layer, b.score
        ax.add_patch(Rectangle((m - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(f"{self.task} ({self.n_pairs} pairs) Spearman x100 - {self.model}; best {score:.2f} "
                     f"({self.rows[r]['label']}, M={m})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path

    def store(self, path: str | os.PathLike | None = None) -> Path:
        """Save the JSON (default: :func:`sweep_path` in the cache, where ``exit_layer: auto`` finds it)."""
        target = Path(path) if path is not None else sweep_path(self.fingerprint, self.recipe, self.task, self.data)
        return _atomic_write_text(target, json.dumps(self.to_dict(), indent=1) + "\n")


def grid(recipe: Recipe, n_layers: int, stops: Sequence[int] | None = None, starts: Sequence[int] = (1,),
         alphas: Sequence[float] = (1.0,), baseline: bool = True) -> list[tuple[str, dict]]:
    """``(label, tp)`` rows: 'no TP' (if ``baseline``) then every start < stop <= n_layers, alpha (with a ``<PST>``).

    >>> from tpsurgery.recipe import parse_recipe
    >>> [label for label, _ in grid(parse_recipe("prompt: '<PST> {text}'"), 4, stops=[2, 9], starts=[0, 1])]
    ['no TP', 'TP [0,2)', 'TP [1,2)']

    Stops beyond the model are left out (one list serves models of several depths); none left is an error.
    """
    if not any(PLACEHOLDER_MARKER in t for t in recipe.templates):
        return [("no TP", {})]
    rows: list[tuple[str, dict]] = [("no TP", {})] if baseline else []
    for a in alphas:
        for s in starts:
            for k in (stops if stops is not None else range(s + 1, n_layers + 1)):
                if s < k <= n_layers:
                    label = f"TP [{s},{k})" + (f" a={a:g}" if len(alphas) > 1 or a != 1.0 else "")
                    rows.append((label, {"start": s, "stop": k, "alpha": a, "source": recipe.tp.source}))
    if stops is not None and not any(label != "no TP" for label, _ in rows):
        raise InputError(None, f"no TP row: stops {list(stops)} with starts {list(starts)} give no span "
                               f"start < stop <= {n_layers} (this model's decoder layers)")
    return rows


def own_rows(recipe: Recipe, baseline: bool = True) -> list[tuple[str, dict]]:
    """``(label, tp)`` rows for the recipe's own TP schedule (any spans, ``resume``), after 'no TP' if ``baseline``.

    >>> from tpsurgery.recipe import parse_recipe
    >>> own_rows(parse_recipe("prompt: '<PST> {text}'\\ntp: {spans: [{start: 1, stop: 3}, {start: 5, stop: 6}], resume: 9}"))[1][0]
    'recipe: TP [1,3)+[5,6) resume 9'
    """
    tp = recipe.tp
    label = "+".join(f"[{s.start},{s.stop})" for s in tp.spans) + (f" resume {tp.resume}" if tp.resume is not None else "")
    label = f"recipe: TP {label.strip()}" + (f" a={tp.alpha:g}" if tp.alpha != 1.0 else "") if not tp.empty else "recipe"
    has_marker = any(PLACEHOLDER_MARKER in t for t in recipe.templates)
    first = [("no TP", {})] if baseline and has_marker and not tp.empty else []
    return first + [(label, tp.model_dump(mode="json"))]


def run_sweep(model: Any, recipe: Any, pairs: Any, *, stops: Sequence[int] | None = None, starts: Sequence[int] = (1,),
              alphas: Sequence[float] = (1.0,), baseline: bool = True, tokenizer: Any = None, batch_size: int = 32,
              progress: bool | None = None, model_name: str | None = None, share_layers: bool = True,
              memory_gb: float = 1.0, backend: str | None = None, own_schedule: bool = False) -> SweepResult:
    """Score every TP row x exit layer on ``pairs`` (a :class:`~tpsurgery.data.PairSet`, normally STS-B dev).

    Each row reads every exit layer from one pass, and rows run the first layers they agree on once
    (``share_layers``; :func:`~tpsurgery.sharing.encode_schedules`): TP [1, k) for k = 2..30 costs 436
    decoder-layer forwards per batch instead of 870. Pairs are processed in chunks whose pooled reads fit in
    ``memory_gb``; only the pair cosines are kept. The recipe's own TP schedule and exit layer are ignored, unless
    ``own_schedule``: then the rows are 'no TP' (if ``baseline``) and the recipe's own schedule, whatever it is
    (several spans, ``resume``; TP from R "up to the exit" read at every M is what ``exit_layer: M`` runs).
    ``progress``: None shows a bar once the run has lasted a few seconds (:class:`tpsurgery.batching.Progress`).
    ``backend``: as in :func:`tpsurgery.apply` (rows share layers on nnsight only).
    """
    if not memory_gb > 0:
        raise InputError(None, f"memory_gb must be a positive number of GiB, got {memory_gb!r}")
    recipe = as_recipe(recipe)
    t0 = time.perf_counter()
    embedder = apply(model, recipe.replace(tp={}, exit_layer=-1), tokenizer=tokenizer, backend=backend)
    rows_tp = own_rows(recipe, baseline) if own_schedule else grid(recipe, embedder.n_layers, stops, starts, alphas,
                                                                     baseline)
    rows, plans = row_plans(embedder, recipe, rows_tp)
    resume = share_layers and isinstance(embedder.backend, ResumableBackend)
    cos, slots = pair_cosines(embedder, plans, pairs, batch_size=batch_size, memory_gb=memory_gb,
                              share_layers=resume, progress=progress)
    for row, row_slots in zip(rows, slots):
        scores = spearman100(cos[:, list(row_slots)], pairs.gold)
        row["scores"] = [None if np.isnan(x) else float(x) for x in scores]  # unrounded: best.yaml recreates it
    name = model_name or getattr(embedder.model, "name_or_path", "") or type(embedder.model).__name__
    work = {"backend": embedder.backend.name, "layer_forwards_per_batch": layer_runs(plans, resume),
            "layer_forwards_per_batch_unshared": layer_runs(plans, resume=False)}
    return SweepResult(name, model_fingerprint(embedder.model), recipe, pairs.name, len(pairs), embedder.n_layers,
                       rows, time.perf_counter() - t0, extra=work, data=pairs_digest(pairs))


def row_plans(embedder: Any, recipe: Recipe, rows_tp: Sequence[tuple[str, dict]]) -> tuple[list[dict], list]:
    """``(rows, plans)`` for the ``(label, tp)`` rows of ``recipe`` (:func:`grid`, :func:`own_rows`), every layer
    read (``exit_layer: -1``); the 'no TP' row of a prompt with a marker hides the placeholder (the honest
    baseline: the prompt without the marker). ``rows[r]`` holds the label, the TP schedule and the placeholder mask."""
    rows, plans = [], []
    for label, tp in rows_tp:
        row_recipe = recipe.replace(tp=tp, exit_layer=-1)
        hidden_ph = label == "no TP" and any(PLACEHOLDER_MARKER in t for t in recipe.templates)
        if hidden_ph:  # the honest baseline: the prompt without the marker, exactly (placeholder.mask: all)
            row_recipe = row_recipe.replace(placeholder={**recipe.placeholder.model_dump(), "mask": "all"})
            label = "no TP (placeholder hidden)"
        plans.append(embedder.plan_for(row_recipe))
        rows.append({"label": label, "tp": row_recipe.tp.model_dump(mode="json"),
                     **({"placeholder_mask": "all"} if hidden_ph else {})})
    return rows, plans


def pair_cosines(embedder: Any, plans: Sequence[Any], pairs: Any, *, batch_size: int = 32, memory_gb: float = 1.0,
                 share_layers: bool = True, progress: bool | None = None) -> tuple[np.ndarray, tuple]:
    """``(cos, slots)``: the cosine of every pair at every ``hidden_states[M]`` of every plan, ``cos[:, slots[r][M]]``
    for plan r (plans that share a layer share its column), from one :func:`~tpsurgery.sharing.encode_schedules`
    pass per chunk of pairs whose pooled reads fit in ``memory_gb``. A sentence's embedding depends on nothing but
    the sentence, so any subset of the pairs is scored from these columns without another pass."""
    hidden = embedder.model.get_input_embeddings().weight.shape[1]
    n_slots = sum(s.n_slots for _, s in share_groups(plans, share_layers))
    # sentences per chunk: encode_schedules peaks at about twice its [n, slots, d] float32 result
    cap = max(batch_size, int(memory_gb * 2**30 // max(1, 2 * n_slots * hidden * 4)))
    cos = np.empty((len(pairs), n_slots))
    slots: tuple = ()
    cut, bad = set(), set()  # pair indices with a truncated / non-finite sentence
    bar = Progress(progress, len(pairs), desc="sweep", unit="pair")
    for lo, hi in _chunks(pairs, cap):
        texts = list(dict.fromkeys([*pairs.a[lo:hi], *pairs.b[lo:hi]]))
        first_pair = {}
        for i in range(hi - 1, lo - 1, -1):
            first_pair.update({pairs.b[i]: (i, "b"), pairs.a[i]: (i, "a")})
        try:
            reads = encode_schedules(embedder, texts, plans, batch_size, share_layers=share_layers, warn=False,
                                     show_progress_bar=False)
        except TpsurgeryError as exc:  # name the pair, whatever the chunking
            k = exc.index
            if k is None or not 0 <= k < len(texts):
                raise
            i, side = first_pair[texts[k]]
            raise renumbered(exc, i, f"{pairs.name} pair {i}, sentence {side}: ") from exc.__cause__
        cut.update(first_pair[texts[k]][0] for k in reads.truncated)
        bad.update(first_pair[texts[k]][0] for k in reads.non_finite)
        slots = reads.slots
        where = {t: i for i, t in enumerate(texts)}
        ia = [where[t] for t in pairs.a[lo:hi]]
        ib = [where[t] for t in pairs.b[lo:hi]]
        for s0 in range(0, n_slots, 32):  # a block of slots at a time: two [pairs, 32, d] copies at most
            cos[lo:hi, s0:s0 + 32] = cosine(reads.values[ia, s0:s0 + 32].numpy(), reads.values[ib, s0:s0 + 32].numpy())
        bar.advance(hi - lo)
    bar.close()
    if cut:
        warnings.warn(f"{pairs.name}: pairs {_listed(cut)} have a sentence longer than the model's limit "
                      f"({embedder.max_length} tokens); it was truncated", UserWarning, stacklevel=3)
    if bad:
        warnings.warn(f"{pairs.name}: pairs {_listed(bad)} have a sentence whose embedding is not finite (NaN or "
                      "inf) at some layer; those cells score NaN (None)", UserWarning, stacklevel=3)
    return cos, slots


def _chunks(pairs: Any, cap: int) -> list[tuple[int, int]]:
    """Consecutive pair ranges with at most ``cap`` distinct sentences each (at least one pair each).

    >>> from types import SimpleNamespace
    >>> _chunks(SimpleNamespace(a=("x", "y", "x", "z"), b=("y", "y", "w", "v")), cap=3)   # {x, y, w}, {z, v}
    [(0, 3), (3, 4)]
    """
    out, lo, seen = [], 0, set()
    for i, (a, b) in enumerate(zip(pairs.a, pairs.b)):
        if len(seen) + (a not in seen) + (b not in seen and b != a) > cap and i > lo:
            out.append((lo, i))
            lo, seen = i, set()
        seen.update((a, b))
    return out + [(lo, len(pairs.a))] if len(pairs.a) else out


def _listed(indices: set[int]) -> str:
    shown = sorted(indices)
    return ", ".join(map(str, shown[:5])) + (f", ... ({len(shown)} in all)" if len(shown) > 5 else "")


def write_outputs(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``sweep.json``, ``heatmap.png`` and ``best.yaml`` in ``out_dir`` (plus the cache copy used by 'auto')."""
    out = Path(out_dir)
    return {"json": result.store(out / "sweep.json"), "heatmap": result.heatmap(out / "heatmap.png"),
            "best": _atomic_write_text(out / "best.yaml", dump_recipe(result.best_recipe())),
            "cache": result.store()}
