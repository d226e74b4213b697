"""``tpsurgery compare``: the paired-bootstrap difference of two recipes' STS scores, per task and on average.

>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> _ = app.command()(compare)
>>> CliRunner().invoke(app, ["/nonexistent.json", "/nonexistent.json"]).exit_code != 0
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import InputError


def pick_run(path: Path, name: Optional[str]) -> dict[str, Any]:
    """The run of a results file named ``name`` (by recipe name or hash); the only run when ``name`` is None."""
    from .evaluation import read_results

    runs = read_results(path)
    names = [r.get("recipe", {}).get("name") or r.get("recipe", {}).get("hash", "?") for r in runs]
    if name is None:
        if len(runs) == 1:
            return runs[0]
        raise InputError(None, f"{path} holds {len(runs)} runs; choose one with --a/--b: {', '.join(names)}")
    hits = [r for r, n in zip(runs, names) if name in (n, r.get("recipe", {}).get("hash"))]
    if len(hits) != 1:
        what = "no run" if not hits else f"{len(hits)} runs"
        raise InputError(None, f"{path}: {what} named {name!r}; runs: {', '.join(names)}")
    return hits[0]


def compare(
    a: Path = typer.Argument(..., help="results JSON of recipe A (tpsurgery eval sts ... --output)"),
    b: Path = typer.Argument(..., help="results JSON of recipe B (may be the same file as A, with --a/--b)"),
    run_a: Optional[str] = typer.Option(None, "--a", help="recipe name (or hash) of A's run, when A holds several"),
    run_b: Optional[str] = typer.Option(None, "--b", help="recipe name (or hash) of B's run, when B holds several"),
    resamples: int = typer.Option(1000, min=100, help="bootstrap resamples (seed fixed: tpsurgery.stats.SEED)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write the rows as JSON"),
) -> None:
    """B - A in Spearman x100 per STS task and on average, with a paired-bootstrap 95% interval.

    Pairs are matched by task and index (both runs must have been scored on the same pairs: their hashes are
    checked); each resample of the pairs scores both recipes, so the interval is that of the difference itself.
    '*' marks a difference whose interval excludes 0.
    """
    from .stats import _run_name, compare_runs, compare_table

    ra, rb = pick_run(a, run_a), pick_run(b, run_b)
    rows = compare_runs(ra, rb, resamples=resamples)
    typer.echo(compare_table(rows, _run_name(ra), _run_name(rb)))
    if output:
        from .textio import atomic_write

        body = {"a": {"file": str(a), "recipe": ra.get("recipe", {}).get("name"), "hash": ra.get("recipe", {}).get("hash")},
                "b": {"file": str(b), "recipe": rb.get("recipe", {}).get("name"), "hash": rb.get("recipe", {}).get("hash")},
                "resamples": resamples, "rows": rows}
        atomic_write(output, json.dumps(body, indent=2) + "\n")
        typer.echo(f"wrote {output}", err=True)
