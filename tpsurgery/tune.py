"""Selection that reports its own optimism: pick a grid cell on some dev pairs, score it on pairs it was not picked on.

The best cell of a grid on the pairs it was chosen on is biased upwards (with many cells and a few hundred pairs,
noise alone makes some cell look good). :func:`tune` therefore splits the dev pairs into ``folds`` parts with a
seeded permutation (a function of the seed, the fold count and the number of pairs only: the split reads no
sentence and no gold score), selects the best cell on the selection part and reports it on the held-out part, next
to a baseline recipe on the same held-out pairs, with bootstrap 95% intervals and the paired-bootstrap difference
(:mod:`tpsurgery.stats`). ``cv=True`` does this once per fold (select on the other folds, score on this one) and
reports the mean held-out score: the estimate of what the tuning *procedure* gives; the recipe written is then
selected on all pairs.

The grid is the sweep's (:mod:`tpsurgery.sweep`: TP rows x exit layers, with ``--vary`` field variants,
:mod:`tpsurgery.variants`), and every pair is embedded once per cell: variants that share templates run in one
:func:`~tpsurgery.sweep.pair_cosines` pass, so rows and variants that agree on their first layers run them once.
A sentence's embedding does not depend on the split, so every split is scored from the same pair cosines.

>>> from tpsurgery.data import load_stsb
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=3)
>>> pairs = load_stsb(["../shared/data/format-samples"], "test")
>>> res = tune(model, 'prompt: "This : <PST> {text} means"', pairs, stops=[2, 3], tokenizer=tok)
>>> len(res.grid.cells), res.n_selection + res.n_held_out == len(pairs)   # 3 TP rows x exits 1..3
(9, True)
>>> lo, hi = res.held_out["chosen_interval"]
>>> bool(lo <= res.held_out["chosen"] <= hi), res.recipe().exit_layer == res.grid.cells[res.chosen]["exit_layer"]
(True, True)
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .api import apply, as_recipe
from .backends import ResumableBackend
from .cache import model_fingerprint
from .data import file_hash
from .errors import InputError, RecipeError
from .evaluation import spearman100
from .recipe import PLACEHOLDER_MARKER, Placeholder, Recipe, dump_recipe
from .sharing import layer_runs
from .stats import RESAMPLES, bootstrap, interval, spearman
from .sweep import grid, pair_cosines, row_plans
from .sweep_store import pairs_digest
from .variants import check_swept, variants


TIE_TOP = 50  # the chosen cell is compared with at most this many - 1 next-best cells for ties


class SelectionNoiseWarning(UserWarning):
    """The chosen cell's held-out gain over the baseline is inside the noise (its 95% interval contains 0), or
    below it."""


@dataclass(frozen=True)
class Grid:
    """The pair cosines of every cell (``cos[:, c]``: ``cells[c]``, a dict with variant, row, exit_layer and the
    recipe that recreates it) and of the baseline recipe (``base``), on all pairs."""

    cells: tuple[dict, ...]
    cos: np.ndarray
    base: np.ndarray
    against: Recipe
    n_layers: int
    work: dict = field(default_factory=dict)

    def label(self, c: int) -> str:
        cell = self.cells[c]
        return ", ".join(filter(None, [cell["variant"], cell["row"], f"exit hidden_states[{cell['exit_layer']}]"]))


def against_recipe(recipe: Recipe, against: Any) -> Recipe:
    """The baseline: ``"recipe"`` (the given recipe as it is), ``"no-tp"`` (the recipe without TP, its placeholder
    hidden: the prompt without the marker) or any recipe (name, file, YAML text). Its exit layer must be a number."""
    if against == "recipe":
        base = recipe
    elif against == "no-tp":
        hide = any(PLACEHOLDER_MARKER in t for t in recipe.templates)
        base = recipe.replace(tp={}, **({"placeholder": {**recipe.placeholder.model_dump(), "mask": "all"}}
                                        if hide else {}))
    else:
        base = as_recipe(against)
    if not isinstance(base.exit_layer, int):
        raise RecipeError("exit_layer", "the baseline of tune needs a numbered exit layer, not 'auto' ('auto' is "
                                        "itself chosen on dev data); set it, or pass --against RECIPE")
    return base


def _embedder_key(recipe: Recipe) -> str:
    """Recipes with equal keys run on one embedder: they differ only in what a plan carries (TP, edits, runs, exit,
    the placeholder's mask)."""
    placeholder = {**recipe.placeholder.model_dump(mode="json"), "mask": Placeholder().mask}
    return recipe.replace(tp={}, edits=[], runs={}, exit_layer=-1, placeholder=placeholder, name="",
                          description="").hash()


def grid_cosines(model: Any, recipe: Any, pairs: Any, *, vary: dict | None = None, stops: Sequence[int] | None = None,
                 starts: Sequence[int] = (1,), alphas: Sequence[float] = (1.0,), exits: Sequence[int] | None = None,
                 baseline_rows: bool = True, against: Any = "recipe", tokenizer: Any = None, backend: str | None = None,
                 batch_size: int = 32, memory_gb: float = 1.0, share_layers: bool = True,
                 progress: bool | None = None) -> Grid:
    """Embed every pair once per cell of the grid (variants x TP rows x ``exits``; default every exit 1..L) and
    once with the baseline (:func:`against_recipe`); variants with the same templates share one pass."""
    recipe = as_recipe(recipe)
    base = against_recipe(recipe, against)
    check_swept(vary or {})
    for r, who in ((recipe, "the tuned recipe"), (base, "the baseline")):
        if not isinstance(r.pooling, str) and r.pooling.layers is not None:
            raise RecipeError("pooling.layers", f"{who} reads several layers; tune scores one exit layer per cell: "
                                                "remove pooling.layers (compare such recipes with eval + compare)")
    todo = variants(recipe, vary) if vary else [("", recipe)]
    groups: dict[str, list] = {}
    for label, variant in todo:
        groups.setdefault(_embedder_key(variant), []).append((label, variant))
    groups.setdefault(_embedder_key(base), [])
    cells: list[dict] = []
    cols: list[np.ndarray] = []
    base_cos, n_layers, shared, unshared = None, 0, 0, 0
    for key, members in groups.items():
        first = members[0][1] if members else base
        embedder = apply(model, first.replace(tp={}, exit_layer=-1), tokenizer=tokenizer, backend=backend)
        n_layers = embedder.n_layers
        wanted = list(exits) if exits is not None else list(range(1, n_layers + 1))
        bad = [m for m in wanted if not 0 <= m <= n_layers]
        if bad:
            raise InputError(None, f"exit layers {bad} are outside hidden_states[0..{n_layers}] of this model")
        if not wanted:
            raise InputError(None, f"no exit layer to choose from; give some in hidden_states[0..{n_layers}]")
        plans, owners = [], []
        for label, variant in members:
            rows, row_plan = row_plans(embedder, variant, grid(variant, n_layers, stops, starts, alphas,
                                                               baseline_rows))
            plans += row_plan
            owners += [(label, variant, row) for row in rows]
        base_at = None
        if key == _embedder_key(base):
            base_at = len(plans)
            plans.append(embedder.plan_for(base))
        resume = share_layers and isinstance(embedder.backend, ResumableBackend)
        cos, slots = pair_cosines(embedder, plans, pairs, batch_size=batch_size, memory_gb=memory_gb,
                                  share_layers=resume, progress=progress)
        shared, unshared = shared + layer_runs(plans, resume), unshared + layer_runs(plans, resume=False)
        for (label, variant, row), row_slots in zip(owners, slots):
            for m in wanted:
                changes: dict[str, Any] = {"tp": row["tp"], "exit_layer": m}
                if row.get("placeholder_mask"):
                    changes["placeholder"] = {**variant.placeholder.model_dump(mode="json"),
                                              "mask": row["placeholder_mask"]}
                cells.append({"variant": label, "row": row["label"], "exit_layer": m,
                              "recipe": variant.replace(**changes)})
                cols.append(cos[:, row_slots[m]])
        if base_at is not None:
            base_cos = cos[:, slots[base_at][plans[base_at].exit_layer]]
    work = {"backend": embedder.backend.name, "layer_forwards_per_batch": shared,
            "layer_forwards_per_batch_unshared": unshared, "passes": len(groups)}
    return Grid(tuple(cells), np.stack(cols, axis=1), base_cos, base, n_layers, work)


def split_folds(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each of ``n`` pairs: a seeded permutation, dealt round-robin, so fold sizes differ
    by at most one. A function of ``(n, folds, seed)`` only.

    >>> split_folds(7, 2, 0).tolist() == split_folds(7, 2, 0).tolist(), np.bincount(split_folds(7, 3, 1)).tolist()
    (True, [3, 2, 2])
    """
    if not isinstance(folds, int) or folds < 2:
        raise InputError(None, f"folds must be an integer >= 2 (selection part + held-out part), got {folds!r}")
    if n < 2 * folds:
        raise InputError(None, f"{n} pairs cannot be split into {folds} folds of at least 2 pairs each (a bootstrap "
                               "interval needs 2); use fewer folds or more pairs")
    out = np.empty(n, dtype=np.int64)
    out[np.random.default_rng([seed, folds, n]).permutation(n)] = np.arange(n) % folds
    return out


def choose(cos: np.ndarray, gold: np.ndarray, idx: np.ndarray) -> tuple[int, np.ndarray]:
    """``(c, scores)``: Spearman x100 of every cell on the pairs ``idx`` only, and the best cell (ties: the first).

    >>> choose(np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]]), np.array([1., 3., 2.]), np.array([0, 1, 2]))[0]
    0
    """
    scores = np.atleast_1d(np.asarray(spearman100(cos[idx], gold[idx]), dtype=np.float64))
    if np.isnan(scores).all():
        raise InputError(None, "every cell scores NaN on the selection pairs (constant similarities): nothing to "
                               "choose; check the exit layers (hidden_states[0] of the last token is the same for "
                               "every sentence)")
    return int(np.nanargmax(scores)), scores


@dataclass
class TuneResult:
    """What :func:`tune` chose and how it did on pairs it did not choose on (see :meth:`report`)."""

    grid: Grid
    chosen: int  # the written cell (holdout: chosen on the selection part; cv: chosen on all pairs)
    selection: dict  # chosen's and baseline's scores on the pairs it was chosen on, and every cell's
    held_out: dict  # chosen, baseline, diff with their intervals (cv: means over the folds)
    n_selection: int
    n_held_out: int
    meta: dict
    warning: str | None = None

    def recipe(self) -> Recipe:
        """The chosen cell's recipe, named and described with its provenance."""
        r = self.grid.cells[self.chosen]["recipe"]
        h = self.held_out
        how = f"mean held-out score of {self.meta['folds']}-fold selection" if self.meta["cv"] else "held-out"
        desc = (f"{r.description} Tuned by tpsurgery tune on {self.meta['task']} ({self.meta['model']}): "
                f"{self.grid.label(self.chosen)}; {how} {h['chosen']:.2f} vs baseline {h['baseline']:.2f}, "
                f"gain {h['diff']:+.2f} [{h['diff_interval'][0]:+.2f}, {h['diff_interval'][1]:+.2f}]").strip()
        return r.replace(name=(r.name or "recipe") + "-tuned", description=desc)

    def to_dict(self) -> dict[str, Any]:
        cells = [{"variant": c["variant"], "row": c["row"], "exit_layer": c["exit_layer"],
                  "selection": None if np.isnan(s) else round(float(s), 4)}
                 for c, s in zip(self.grid.cells, self.selection["scores"])]
        sel = {k: v for k, v in self.selection.items() if k != "scores"}
        return {"tpsurgery_tune": 1, **self.meta, "chosen": {"cell": self.chosen, "label": self.grid.label(self.chosen),
                "recipe": self.recipe().to_dict()}, "baseline": self.grid.against.to_dict(), "selection": sel,
                "held_out": self.held_out, "n_selection": self.n_selection, "n_held_out": self.n_held_out,
                "warning": self.warning, "work": self.grid.work, "cells": cells}

    def report(self) -> str:
        """The lines ``tpsurgery tune`` prints."""
        m, s, h = self.meta, self.selection, self.held_out
        part = (f"{m['folds']}-fold cross-validation (each fold held out once)" if m["cv"] else
                f"{self.n_selection} selection / {self.n_held_out} held-out pairs")
        iv = lambda x: f"[{x[0]:.2f}, {x[1]:.2f}]"  # noqa: E731
        ivd = lambda x: f"[{x[0]:+.2f}, {x[1]:+.2f}]"  # noqa: E731
        lines = [f"grid: {len(self.grid.cells)} cells on {m['task']} ({m['n_pairs']} pairs, data {m['data']}); "
                 f"split seed {m['seed']}: {part}",
                 f"baseline: {self._baseline_name()}",
                 f"layer forwards per batch: {self.grid.work['layer_forwards_per_batch']} of "
                 f"{self.grid.work['layer_forwards_per_batch_unshared']} unshared",
                 f"chosen{' on all pairs' if m['cv'] else ' on the selection pairs'}: {self.grid.label(self.chosen)}"
                 f" -> {s['chosen']:.2f} (baseline {s['baseline']:.2f}, gain {s['chosen'] - s['baseline']:+.2f})",
                 f"tied with it there: {len(s['tied_cells'])} of the {s['tied_checked']} next-best cells (paired 95% "
                 "interval of the difference reaches 0)" + (f", e.g. {s['tied_cells'][0]}" if s["tied_cells"] else "")]
        where = f"mean of {m['folds']} held-out folds" if m["cv"] else f"held-out, {self.n_held_out} pairs"
        lines += [f"{where}: chosen {h['chosen']:.2f} {iv(h['chosen_interval'])}; baseline {h['baseline']:.2f} "
                  f"{iv(h['baseline_interval'])}",
                  f"held-out gain over the baseline: {h['diff']:+.2f} {ivd(h['diff_interval'])} (paired bootstrap, "
                  f"{m['resamples']} resamples, 95%)",
                  f"optimism: the gain was {h['selection_gain']:+.2f} on the pairs it was chosen on, "
                  f"{h['diff']:+.2f} on pairs it was not"]
        if m["cv"]:
            lines.append(f"folds chose: {'; '.join(h['fold_choices'])} ({h['agree']} of {m['folds']} the same as "
                         "on all pairs)")
        return "\n".join(lines + ([f"warning: {self.warning}"] if self.warning else []))

    def _baseline_name(self) -> str:
        b, how = self.grid.against, self.meta["grid"].get("against", "recipe")
        what = {"recipe": "the given recipe as it is", "no-tp": "the given recipe without TP, placeholder hidden"}
        e = b.exit_layer if b.exit_layer >= 0 else self.grid.n_layers + 1 + b.exit_layer
        return f"{what.get(how, b.name or 'recipe')} [{b.hash()}], exit hidden_states[{e}]"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``tuned.yaml`` (the chosen recipe, provenance in its description and in comment lines) and ``tune.json``."""
        from .textio import atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        head = "".join(f"# {line}\n" for line in self.report().splitlines())
        head += (f"# grid options: {json.dumps(self.meta['grid'])}\n"
                 f"# baseline recipe hash: {self.grid.against.hash()}\n")
        return {"recipe": atomic_write(out / "tuned.yaml", (head + dump_recipe(self.recipe())).encode()),
                "json": atomic_write(out / "tune.json", (json.dumps(self.to_dict(), indent=1) + "\n").encode())}


def _held_out(cos: np.ndarray, base: np.ndarray, gold: np.ndarray, idx: np.ndarray, task: str,
              resamples: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Chosen and baseline Spearman x100 on the pairs ``idx``, and their bootstrap replicates (same resamples)."""
    return (spearman(cos[idx], gold[idx]), spearman(base[idx], gold[idx]),
            bootstrap(cos[idx], gold[idx], task, resamples), bootstrap(base[idx], gold[idx], task, resamples))


def score_split(g: Grid, gold: np.ndarray, task: str, folds: int = 2, cv: bool = False, seed: int = 0,
                resamples: int = RESAMPLES) -> tuple[int, dict, dict, int, int]:
    """``(chosen, selection, held_out, n_selection, n_held_out)`` of :class:`TuneResult` from a grid's cosines.
    Selection reads the cosines and gold scores of the selection pairs only."""
    gold = np.asarray(gold, dtype=np.float64)
    fold = split_folds(len(gold), folds, seed)
    rounds = range(folds) if cv else [0]
    chosen_s, held, reps, choices, sel_gain = [], [], [], [], []
    for f in rounds:
        sel, ho = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        c, scores = choose(g.cos, gold, sel)
        held.append(_held_out(g.cos[:, c], g.base, gold, ho, f"{task} fold {f + 1}/{folds}", resamples))
        sel_gain.append(scores[c] - spearman(g.base[sel], gold[sel]))
        chosen_s.append(c)
        choices.append(g.label(c))
    all_pairs = np.arange(len(gold))
    chosen, scores = choose(g.cos, gold, all_pairs) if cv else (chosen_s[0], scores)
    sel_idx = all_pairs if cv else np.flatnonzero(fold != 0)
    a, b, ra, rb = (np.mean([h[k] for h in held], axis=0) for k in range(4))
    held_out = {"chosen": round(float(a), 4), "chosen_interval": list(interval(ra)),
                "baseline": round(float(b), 4), "baseline_interval": list(interval(rb)),
                "diff": round(float(a) - float(b), 4), "diff_interval": list(interval(ra - rb)),
                "selection_gain": round(float(np.mean(sel_gain)), 4)}
    if cv:
        held_out.update(fold_choices=choices, agree=sum(c == chosen for c in chosen_s),
                        folds=[{"chosen": g.label(c), "held_out": round(h[0], 4), "baseline": round(h[1], 4)}
                               for c, h in zip(chosen_s, held)])
    selection = {"chosen": float(scores[chosen]), "baseline": spearman(g.base[sel_idx], gold[sel_idx]),
                 "scores": scores, **ties(g, gold, sel_idx, chosen, scores, f"{task} selection", resamples)}
    n_ho = int(np.mean([np.sum(fold == f) for f in rounds]))
    return chosen, selection, held_out, len(gold) - n_ho, n_ho


def ties(g: Grid, gold: np.ndarray, idx: np.ndarray, chosen: int, scores: np.ndarray, task: str,
         resamples: int = RESAMPLES, top: int = TIE_TOP) -> dict:
    """How sure the choice is: of the ``top - 1`` next-best cells on the pairs ``idx``, those whose paired-bootstrap
    95% interval of (chosen - cell) reaches 0 there (``tied_cells``, best first; ``tied_checked``: how many were
    compared)."""
    order = [int(c) for c in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
             if c != chosen and not np.isnan(scores[c])][:top - 1]
    rc = bootstrap(g.cos[idx, chosen], gold[idx], task, resamples)
    tied = [c for c in order if interval(rc - bootstrap(g.cos[idx, c], gold[idx], task, resamples))[0] <= 0]
    return {"tied_checked": len(order), "tied_cells": [g.label(c) for c in tied]}


def noise_warning(held_out: dict, same: bool) -> str | None:
    """The warning line for a held-out gain that the data cannot tell from 0 (or that is negative).

    >>> noise_warning({"diff": 0.4, "diff_interval": [-0.3, 1.2]}, False).split(":")[0]
    "the chosen cell's held-out gain over the baseline, +0.40 [-0.30, +1.20], is inside the noise"
    >>> noise_warning({"diff": 2.0, "diff_interval": [0.5, 3.1]}, False) is None
    True
    """
    d, (lo, hi) = held_out["diff"], held_out["diff_interval"]
    if same:
        return "the chosen cell computes the baseline's embeddings: tuning found nothing better on these pairs"
    if hi < 0:
        return (f"the chosen cell is worse than the baseline on held-out pairs, {d:+.2f} [{lo:+.2f}, {hi:+.2f}]: "
                "its selection score was noise; keep the baseline")
    if lo <= 0:
        return (f"the chosen cell's held-out gain over the baseline, {d:+.2f} [{lo:+.2f}, {hi:+.2f}], is inside the "
                "noise: the 95% interval contains 0, so these pairs cannot tell it from the baseline")
    return None


def tune(model: Any, recipe: Any, pairs: Any, *, folds: int = 2, cv: bool = False, seed: int = 0,
         resamples: int = RESAMPLES, model_name: str | None = None, **grid_kw: Any) -> TuneResult:
    """Choose a grid cell on part of ``pairs`` and report it on the rest (module doc). ``grid_kw``: the grid and
    engine options of :func:`grid_cosines` (``vary``, ``stops``, ``exits``, ``against``, ``tokenizer``, ...).
    Warns :class:`SelectionNoiseWarning` (the text is also ``result.warning``) when the held-out gain is noise."""
    t0 = time.perf_counter()
    split_folds(len(pairs), folds, seed)  # a bad split is refused before any embedding
    g = grid_cosines(model, recipe, pairs, **grid_kw)
    chosen, selection, held_out, n_sel, n_ho = score_split(g, pairs.gold, pairs.name, folds, cv, seed, resamples)
    keys = ("vary", "stops", "starts", "alphas", "exits", "baseline_rows", "against")
    meta = {"model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
            "fingerprint": model_fingerprint(model), "task": pairs.name, "n_pairs": len(pairs),
            "data": pairs_digest(pairs), "files": {str(f): file_hash(Path(f)) for f in pairs.files},
            "origin": pairs.origin, "seed": seed, "folds": folds,
            "cv": cv, "resamples": resamples, "grid": {k: _plain(grid_kw[k]) for k in keys if k in grid_kw},
            "seconds": 0.0}
    same = bool(np.array_equal(g.cos[:, chosen], g.base))
    res = TuneResult(g, chosen, selection, held_out, n_sel, n_ho, meta, noise_warning(held_out, same))
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    if res.warning:
        warnings.warn(res.warning, SelectionNoiseWarning, stacklevel=2)
    return res


def _plain(value: Any) -> Any:
    """Grid options as JSON data (a baseline Recipe by its hash)."""
    if isinstance(value, Recipe):
        return value.hash()
    if isinstance(value, (list, tuple, range)):
        return [_plain(v) for v in value]
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value
