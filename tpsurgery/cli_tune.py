"""``tpsurgery tune``: choose a grid cell on part of the dev pairs and report it on pairs it was not chosen on.

>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> _ = app.command()(tune)
>>> CliRunner().invoke(app, ["-r", "prompteol-tp", "--folds", "1"]).exit_code != 0
True
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from .cli_eval import (BACKEND_OPT, DATA_OPT, DEVICE_OPT, HUB_OPT, LIMIT_OPT, MODEL_OPT, SPREAD_BY_OPT, SPREAD_OPT,
                       _split_tasks, data_dirs, parse_floats, parse_ints, quiet, required, spread_mode)
from .errors import InputError


def tune(
    recipe: str = typer.Option(..., "--recipe", "-r", callback=required, help="recipe to tune (its prompt, "
                               "placeholder, pooling, edits; TP and exit layer are the grid's)"),
    model: str = MODEL_OPT,
    device: Optional[str] = DEVICE_OPT,
    backend: str = BACKEND_OPT,
    data_dir: Optional[list[Path]] = DATA_OPT,
    task: str = typer.Option("stsb-dev", help="STS task to tune on (never a test set for reported numbers)"),
    limit: Optional[int] = LIMIT_OPT,
    spread: bool = SPREAD_OPT,
    spread_by: str = SPREAD_BY_OPT,
    hub: bool = HUB_OPT,
    stops: Optional[str] = typer.Option(None, help="TP stop layers k, e.g. '2-8' or '2,4,8' (default: all)"),
    starts: str = typer.Option("1", help="TP start layers, e.g. '0,1'"),
    alphas: str = typer.Option("1.0", help="TP mixing weights, e.g. '1,0.5'"),
    exits: Optional[str] = typer.Option(None, help="exit layers M (hidden_states indices), e.g. '24-27' "
                                        "(default: 1..L)"),
    vary: Optional[list[str]] = typer.Option(None, help="also grid over recipe fields, FIELD=V1,V2 (repeatable, as "
                                             "in `tpsurgery sweep --vary`)"),
    baseline_rows: bool = typer.Option(True, "--with-no-tp/--without-no-tp", help="the grid includes the 'no TP' "
                                       "row (placeholder hidden) of each variant"),
    against: str = typer.Option("recipe", help="baseline: 'recipe' (the given recipe as it is), 'no-tp' (it without "
                                "TP, placeholder hidden) or a recipe file / shipped name"),
    folds: int = typer.Option(2, help="split the pairs into this many folds (seeded permutation); without --cv "
                              "fold 1 is held out (1/FOLDS of the pairs) and the rest select"),
    cv: bool = typer.Option(False, "--cv", help="cross-validate: select on the other folds and score on each fold in "
                            "turn; report the mean held-out score; the recipe written is chosen on all pairs"),
    seed: int = typer.Option(0, help="split seed"),
    resamples: int = typer.Option(1000, min=100, help="bootstrap resamples (seed fixed: tpsurgery.stats.SEED)"),
    batch_size: int = typer.Option(32, help="sentences per forward pass"),
    memory_gb: float = typer.Option(1.0, help="memory for the pooled reads of one chunk of pairs"),
    out_dir: Path = typer.Option(Path("tune-out"), "--out-dir", "-o", help="folder for tuned.yaml and tune.json"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Choose the best grid cell (TP rows x exit layers x --vary variants) on a selection part of the dev pairs and
    report it on held-out pairs, against a baseline, with bootstrap 95% intervals and the paired difference.

    Writes the chosen recipe (provenance in its description and comments) and tune.json; prints one 'warning:' line
    when the held-out gain over the baseline is inside the noise (its interval contains 0) or negative.
    """
    from .api import as_recipe, resolve_model
    from .evaluation import load_task
    from .tune import SelectionNoiseWarning, against_recipe, split_folds
    from .tune import tune as run_tune
    from .variants import parse_vary, variants

    _split_tasks(task, "sts")
    grid = parse_vary(vary or [])
    base = as_recipe(recipe)
    if grid:
        variants(base, grid)  # every variant is a valid recipe before any model is loaded
    against_recipe(base, against)
    kw = dict(stops=parse_ints(stops) if stops else None, starts=parse_ints(starts), alphas=parse_floats(alphas),
              exits=parse_ints(exits) if exits else None)
    for name, values in kw.items():
        if values is not None and not values:
            raise InputError(None, f"--{name} names no value")
    pairs = load_task(task, data_dirs(data_dir, hub), limit, spread_mode(spread, spread_by), hub)
    split_folds(len(pairs), folds, seed)
    with quiet(not progress):
        hf_model, tok, _ = resolve_model(model, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionNoiseWarning)  # printed as the report's 'warning:' line
        res = run_tune(hf_model, base, pairs, folds=folds, cv=cv, seed=seed, resamples=resamples, model_name=model,
                       vary=grid or None, baseline_rows=baseline_rows, against=against, tokenizer=tok,
                       backend=backend, batch_size=batch_size, memory_gb=memory_gb, progress=progress, **kw)
    typer.echo(res.report())
    for k, p in res.write(out_dir).items():
        typer.echo(f"wrote {k}: {p}")
