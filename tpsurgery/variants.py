"""Recipe grids: every combination of values for some recipe fields, one recipe (and one exit-layer sweep) each.

``tpsurgery sweep --vary edits.layers=3,5,7 --vary edits.factor=0.5,2`` sweeps Contrastive Prompting's layer l and
factor C: each combination is a recipe of its own, swept over every exit layer (and the TP rows of
:func:`tpsurgery.sweep.grid`) and stored where ``exit_layer: auto`` finds it. A field is a dotted path into the recipe
(``placeholder.init``, ``edits.0.factor``; ``tp.*`` with ``--own-schedule`` only: otherwise the sweep's TP rows replace
the recipe's ``tp``, and never ``exit_layer``: every exit is read anyway); a path through a list without an index
(``edits.factor``) sets the field on every element that has it.

>>> from tpsurgery.recipe import parse_recipe
>>> cp = parse_recipe('''
... prompt: 'This sentence : "{text}" means in one word:"'
... runs: {irrelevant: 'The irrelevant information of this sentence : "{text}" means in one word:"'}
... edits:
...   - {site: attn_out_in, layers: 5, rows: last, op: subtract, run: irrelevant}
...   - {site: attn_out_in, layers: 5, rows: last, op: scale, factor: 2.0}
... ''')
>>> vary = parse_vary(["edits.layers=3,5", "edits.factor=0.5,2"])
>>> vary
{'edits.layers': [3, 5], 'edits.factor': [0.5, 2]}
>>> [(label, [getattr(e, "factor", None) for e in r.edits]) for label, r in variants(cp, vary)][:2]
[('layers=3 factor=0.5', [None, 0.5]), ('layers=3 factor=2', [None, 2.0])]
>>> variants(cp, parse_vary(["edits.alpha=0.5"]))
Traceback (most recent call last):
...
tpsurgery.errors.RecipeError: recipe field `edits.alpha`: no element of `edits` has `alpha` (they have: factor, layers, op, rows, run, site)
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from .errors import RecipeError
from .plots import agg_figure
from .recipe import Recipe, parse_recipe


def parse_vary(specs: Sequence[str]) -> dict[str, list]:
    """``["FIELD=V1,V2", ...]`` -> ``{FIELD: [V1, V2]}`` (values read as YAML scalars: ``2`` is an int, ``x`` a str)."""
    out: dict[str, list] = {}
    for spec in specs:
        path, sep, values = spec.partition("=")
        path = path.strip()
        if not sep or not path or not values.strip():
            raise RecipeError(path or spec, f"--vary wants FIELD=V1,V2,... (e.g. edits.factor=0.5,2), got {spec!r}")
        if path in out:
            raise RecipeError(path, "is varied twice; give all its values in one --vary")
        out[path] = [yaml.safe_load(v.strip()) for v in values.split(",")]
    return out


def set_field(data: Any, path: str, value: Any, _at: str = "") -> Any:
    """A copy of ``data`` (plain recipe data) with the dotted ``path`` set to ``value``.

    >>> set_field({"tp": {"stop": 8}, "edits": [{"factor": 2}, {"op": "x"}]}, "edits.factor", 3)
    {'tp': {'stop': 8}, 'edits': [{'factor': 3}, {'op': 'x'}]}
    """
    head, _, rest = path.partition(".")
    where = f"{_at}.{head}" if _at else head
    if isinstance(data, list):
        if head.lstrip("-").isdigit():
            i = int(head)
            if not -len(data) <= i < len(data):
                raise RecipeError(where, f"index {i} is out of range: `{_at}` has {len(data)} elements")
            return [set_field(x, rest, value, where) if k == i % len(data) and rest else
                    (value if k == i % len(data) else x) for k, x in enumerate(data)]
        hits = [isinstance(x, dict) and head in x for x in data]
        if not any(hits):
            keys = sorted({k for x in data if isinstance(x, dict) for k in x})
            raise RecipeError(f"{_at}.{path}", f"no element of `{_at}` has `{head}` (they have: {', '.join(keys)})")
        return [set_field(x, path, value, _at) if hit else x for x, hit in zip(data, hits)]
    if not isinstance(data, dict):
        raise RecipeError(where, f"`{_at}` is {data!r}, not a section with fields")
    if not rest:
        return {**data, head: value}
    if head not in data:
        raise RecipeError(where, f"the recipe has no section `{head}` (it has: {', '.join(sorted(data))})")
    return {**data, head: set_field(data[head], rest, value, where)}


def variants(recipe: Recipe, vary: dict[str, list]) -> list[tuple[str, Recipe]]:
    """``(label, recipe)`` for every combination of the ``vary`` values (the last field varies fastest)."""
    names = {path: path.rsplit(".", 1)[-1] for path in vary}
    if len(set(names.values())) < len(names):
        names = {path: path for path in vary}
    out = []
    for combo in itertools.product(*vary.values()):
        data = recipe.to_dict()
        for path, value in zip(vary, combo):
            data = set_field(data, path, value)
        label = " ".join(f"{names[p]}={v:g}" if isinstance(v, float) else f"{names[p]}={v}"
                         for p, v in zip(vary, combo))
        desc = f"{recipe.description} Variant: {label}.".strip()
        try:
            out.append((label, parse_recipe({**data, "name": f"{recipe.name or 'recipe'} {label}",
                                             "description": desc})))
        except RecipeError as exc:  # the recipe's own check, named for the variant
            raise RecipeError(exc.field, f"{exc.message} (in the variant {label})",
                              more=[(f, f"{m} (in the variant {label})") for f, m in exc.problems[1:]]) from exc
    return out


@dataclass(frozen=True)
class VariantSweeps:
    """The exit-layer sweeps of every variant: ``sweeps[k]`` is the :class:`~tpsurgery.sweep.SweepResult` of
    ``labels[k]``; ``exit_layer`` is the varied recipe's own exit as a ``hidden_states`` index (None for 'auto')."""

    labels: tuple[str, ...]
    sweeps: tuple[Any, ...]
    exit_layer: int | None
    name: str = "recipe"  # the varied recipe's name

    def table(self) -> str:
        """A markdown table: one line per variant and TP row, score at the recipe's exit and at the best exit."""
        at = f"hidden_states[{self.exit_layer}]" if self.exit_layer is not None else "recipe exit"
        first = self.sweeps[0] if self.sweeps else None
        head = [f"{first.task} Spearman x100, {first.n_pairs} pairs, {first.model}", ""] if first is not None else []
        lines = [*head, f"| variant | row | {at} | best exit M | best |", "|---|---|---|---|---|"]
        for label, res in zip(self.labels, self.sweeps):
            for row in res.rows:
                s = np.array(row["scores"], dtype=np.float64)
                own = s[self.exit_layer] if self.exit_layer is not None else float("nan")
                m = int(np.nanargmax(s))
                lines.append(f"| {label} | {row['label']} | {own:.2f} | {m} | {s[m]:.2f} |")
        return "\n".join(lines) + "\n"

    def best(self) -> tuple[int, Any]:
        """``(k, best)``: the variant ``k`` whose sweep holds the best cell of all, and that cell
        (:meth:`tpsurgery.sweep.SweepResult.best`; ties: the first variant)."""
        cells = [(res.best(), k) for k, res in enumerate(self.sweeps)]
        b, k = max(cells, key=lambda c: (c[0].score, -c[1]))
        return k, b

    def best_recipe(self) -> Recipe:
        """The recipe that recreates the best cell of every variant exactly (variant, TP row, exit layer)."""
        k, _ = self.best()
        return self.sweeps[k].best_recipe()

    def to_dict(self) -> dict[str, Any]:
        k, b = self.best()
        return {"exit_layer": self.exit_layer, "best": {"variant": self.labels[k], "label": b.label,
                                                         "exit_layer": b.exit_layer, "score": b.score},
                "variants": [{"label": label, **res.to_dict()} for label, res in zip(self.labels, self.sweeps)]}

    def curves(self, path: str | Path) -> Path:
        """Spearman x100 against the exit layer, one line per variant and TP row (PNG, Agg backend)."""
        fig = agg_figure(8, 4.5, "exit-layer curves")
        ax = fig.add_subplot()
        for label, res in zip(self.labels, self.sweeps):
            for row in res.rows:
                s = np.array(row["scores"], dtype=np.float64)
                ax.plot(range(len(s)), s, marker=".", label=f"{label}, {row['label']}")
        if self.exit_layer is not None:
            ax.axvline(self.exit_layer, color="grey", linestyle=":", linewidth=1)
        first = self.sweeps[0]
        ax.set_xlabel("exit layer M (hidden_states[M])")
        ax.set_ylabel(f"{first.task} Spearman x100")
        ax.set_title(f"{self.name} variants - {first.model} ({first.n_pairs} pairs)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``variants.json``, ``variants.md``, ``curves.png`` and ``best.yaml`` (the best cell of all variants,
        :meth:`best_recipe`) in ``out_dir``."""
        from .recipe import dump_recipe
        from .textio import atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "variants.json", (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        atomic_write(out / "variants.md", self.table().encode())
        return {"json": out / "variants.json", "table": out / "variants.md", "curves": self.curves(out / "curves.png"),
                "best": atomic_write(out / "best.yaml", dump_recipe(self.best_recipe()))}


def check_swept(vary: dict[str, list], own_schedule: bool = False) -> None:
    """Refuse varied fields that a sweep sets itself, which would be overridden without a word: ``exit_layer`` (every
    exit is read from one pass) and, unless the sweep runs the recipe's own schedule, ``tp`` (the TP rows of
    :func:`tpsurgery.sweep.grid` replace it).

    >>> check_swept({"tp.alpha": [0.5, 1.0]})
    Traceback (most recent call last):
    ...
    tpsurgery.errors.RecipeError: recipe field `tp.alpha`: is set by the sweep's TP rows (--starts / --stops / --alphas replace the recipe's `tp`): vary TP with those, or use --own-schedule (tpsurgery sweep)
    """
    for path in vary:
        if path == "exit_layer" or path.startswith("exit_layer."):
            raise RecipeError(path, "a sweep reads every exit layer from one pass: compare exits in its table "
                                    "(tpsurgery tune: --exits), not with --vary")
        if (path == "tp" or path.startswith("tp.")) and not own_schedule:
            raise RecipeError(path, "is set by the sweep's TP rows (--starts / --stops / --alphas replace the "
                                    "recipe's `tp`): vary TP with those, or use --own-schedule (tpsurgery sweep)")


def run_variants(model: Any, recipe: Recipe, vary: dict[str, list], pairs: Any, **sweep_kw: Any) -> VariantSweeps:
    """Sweep every variant of ``recipe`` (:func:`variants`) with :func:`tpsurgery.sweep.run_sweep` and store each
    sweep in the cache (``exit_layer: auto`` of a variant recipe finds its own)."""
    from .sweep import run_sweep

    check_swept(vary, sweep_kw.get("own_schedule", False))

    labels, sweeps = [], []
    n_layers = None
    for label, variant in variants(recipe, vary):
        res = run_sweep(model, variant, pairs, **sweep_kw)
        res.store()
        labels.append(label)
        sweeps.append(res)
        n_layers = res.n_layers
    e = recipe.exit_layer
    exit_layer = None if not isinstance(e, int) or n_layers is None else (e if e >= 0 else n_layers + 1 + e)
    return VariantSweeps(tuple(labels), tuple(sweeps), exit_layer, recipe.name or "recipe")
