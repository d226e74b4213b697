"""The evaluation commands of the ``tpsurgery`` CLI: ``eval sts``, ``eval transfer``, ``sweep``, ``regress``.

>>> parse_ints("2-4,8"), parse_floats("1,0.5")
([2, 3, 4, 8], [1.0, 0.5])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import InputError

eval_app = typer.Typer(help="Evaluate recipes on STS and transfer tasks (SentEval data layout).", no_args_is_help=True)

DATA_HELP = ("SentEval-layout data folder; repeat to search several (first match wins). "
             "Default: $TPSURGERY_DATA (os.pathsep-separated)")
MODEL_OPT = typer.Option("smollm2-135m", "--model", "-m", help="HF id or folder, .gguf file, or smollm2-135m")
DEVICE_OPT = typer.Option(None, "--device", help="torch device to load the model on (e.g. cuda); default cpu")
BACKEND_OPT = typer.Option("nnsight", "--backend", help="engine: nnsight, or transformer_lens (a TransformerBridge "
                           "around a copy of the model; no prompt-prefix reuse, sweep rows not "
                           "shared)")


def required(param: typer.CallbackParam, value: Any) -> Any:
    """Callback of required options: typer < 0.29 with click >= 8.2 passes a missing one as None instead of failing
    (then a traceback deep in the command); this makes it click's usage error on every typer."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise typer.BadParameter("missing (this option is required)", param=param)
    return value


RESUME_OPT = typer.Option(True, help="store embeddings in the embedding cache as batches finish and reuse them, and "
                          "keep finished tasks of the same run in --output: a rerun after an interruption computes only "
                          "what is missing ($TPSURGERY_CACHE/embeddings); --no-resume recomputes everything")


def open_cache(resume: bool) -> object:
    """The CLI's embedding cache (None with ``--no-resume``); an unusable cache is one warning, not an error."""
    if not resume:
        return None
    from .cache import EmbeddingCache

    return EmbeddingCache()


def quiet(on: bool):
    """Silence the progress bars of transformers / huggingface_hub (model loading, GGUF conversion) while ``on``."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    from .resources import no_library_bars

    return no_library_bars()


def data_dirs(given: Optional[list[Path]], hub: bool = False) -> list[Path]:
    dirs = list(given or []) or [Path(p) for p in os.environ.get("TPSURGERY_DATA", "").split(os.pathsep) if p]
    if not dirs and not hub:
        raise InputError(None, "no data folder: pass --data-dir (SentEval layout), set TPSURGERY_DATA, or use --hub "
                               "(STS sets from the Hugging Face hub, online)")
    return dirs


def parse_ints(text: str) -> list[int]:
    """``"2-5,8"`` -> ``[2, 3, 4, 5, 8]`` (ranges inclusive)."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
    except ValueError:
        raise InputError(None, f"expected integers like '2-8' or '2,4,8', got {text!r}") from None
    return out


def parse_floats(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(None, f"expected numbers like '1,0.5', got {text!r}") from None


def _split_tasks(text: str, kind: str) -> list[str]:
    from .evaluation import TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS or TASKS[t].kind != kind:
            known = ", ".join(n for n, v in TASKS.items() if v.kind == kind)
            raise InputError(None, f"unknown {kind} task {t!r}; known: {known}")
    return tasks


def _evaluate(kind: str, recipes: list[str], model: str, data: Optional[list[Path]], tasks: str, limit: Optional[int],
              batch_size: int, output: Optional[Path], markdown: Optional[Path], progress: bool, kfold: int = 10,
              n_jobs: int = 1, device: Optional[str] = None, spread: bool | str = False, hub: bool = False,
              backend: str = "nnsight", standardize: bool = True, resume: bool = True) -> None:
    from .api import apply, resolve_model
    from .distributed import ShardedEncoder, process_group, rank_device, world_from_env
    from .evaluation import _atomic_write_text, evaluate, markdown_table, write_results

    from .textio import check_output

    world = world_from_env()  # torchrun: each rank embeds a share of every encode call; rank 0 reports
    for path, what in ((output, "--output"), (markdown, "--markdown")):
        if path is not None:
            check_output(path, what=what)  # a device or folder is refused before any work
    dirs = data_dirs(data, hub)
    names = _split_tasks(tasks, kind)
    with quiet(not progress):
        hf_model, tok, _ = resolve_model(model, device=rank_device(device, world))
    cache = open_cache(resume)
    runs = []
    with process_group(world):
        for r in recipes:
            emb = apply(hf_model, r, tokenizer=tok, backend=backend, embedding_cache=cache)
            kw = dict(model_name=model, limit=limit, batch_size=batch_size, progress=progress and world.main,
                      kfold=kfold, n_jobs=n_jobs, spread=spread, hub=hub, standardize=standardize)
            if output and world.size == 1:  # each finished task is written at once; a rerun skips it
                from .resumable import evaluate_into

                runs.append(evaluate_into(output, emb, names, dirs, log=lambda m: typer.echo(m, err=True),
                                          keep=resume, **kw)[0])
            else:
                runs.append(evaluate(ShardedEncoder(emb, world) if world.size > 1 else emb, names, dirs, **kw))
            if world.main:
                typer.echo(f"{emb.recipe.name or r}: " + ", ".join(_score(t, v) for t, v in
                                                                  runs[-1]["scores"].items())
                           + f" ({runs[-1]['seconds']:.1f} s)", err=True)
    if not world.main:
        return
    table = markdown_table(runs, names)
    typer.echo(table)
    if output:
        typer.echo(f"wrote {write_results(output, runs)}", err=True)
    if markdown:
        typer.echo(f"wrote {_atomic_write_text(markdown, table + chr(10))}", err=True)


def _score(task: str, value: float) -> str:
    """``task 71.23``, or for NaN the reason: a correlation of constant (or NaN) similarities is undefined.

    >>> _score("stsb", float("nan"))
    'stsb nan (undefined: every pair got the same similarity, or NaN; e.g. all-zero or non-finite embeddings, see the warnings)'
    """
    if value != value:
        return (f"{task} nan (undefined: every pair got the same similarity, or NaN; e.g. all-zero or non-finite "
                "embeddings, see the warnings)")
    return f"{task} {value:.2f}"


RECIPES_OPT = typer.Option(..., "--recipe", "-r", callback=required, help="recipe YAML file or shipped name; repeat for several rows")
DATA_OPT = typer.Option(None, "--data-dir", "-d", help=DATA_HELP)
LIMIT_OPT = typer.Option(None, help="use only the first N pairs (STS) / lines per split or class (transfer)")
SPREAD_OPT = typer.Option(False, "--spread", help="with --limit N: N evenly spaced pairs / lines instead of the "
                          "first N (--spread-by: in file order or over the gold-score range)")
SPREAD_BY_OPT = typer.Option("order", "--spread-by", help="with --spread: 'order' (evenly spaced in file order: every "
                             "sub-set / genre / class represented) or 'gold' (evenly spaced quantiles of the gold "
                             "score / label, kept in file order)")


def spread_mode(spread: bool, by: str):
    """The ``spread`` argument of :func:`tpsurgery.evaluation.load_task` (``True`` is file order)."""
    from .data import SPREAD_MODES

    if by not in SPREAD_MODES:
        raise InputError(None, f"--spread-by {by!r}; choose from {', '.join(SPREAD_MODES)}")
    return (True if by == "order" else by) if spread else False
HUB_OPT = typer.Option(False, "--hub", help="STS sets that no --data-dir holds come from MTEB's Hugging Face hub "
                       "copies (pinned revisions; online; STS-B there is cased, SentEval's is tokenized)")
OUT_OPT = typer.Option(None, "--output", "-o", help="results JSON to write")
MD_OPT = typer.Option(None, "--markdown", help="markdown table to write")


@eval_app.command("sts")
def eval_sts(
    recipe: list[str] = RECIPES_OPT,
    model: str = MODEL_OPT,
    device: Optional[str] = DEVICE_OPT,
    backend: str = BACKEND_OPT,
    data_dir: Optional[list[Path]] = DATA_OPT,
    tasks: str = typer.Option("sts12,sts13,sts14,sts15,sts16,stsb,sickr", help="comma-separated; also stsb-dev"),
    limit: Optional[int] = LIMIT_OPT,
    spread: bool = SPREAD_OPT,
    spread_by: str = SPREAD_BY_OPT,
    hub: bool = HUB_OPT,
    batch_size: int = typer.Option(32, help="sentences per forward pass"),
    output: Optional[Path] = OUT_OPT,
    markdown: Optional[Path] = MD_OPT,
    progress: bool = typer.Option(True, help="show progress bars"),
    resume: bool = RESUME_OPT,
) -> None:
    """STS: cosine similarity, Spearman x100 (STS12-16 in the 'all' setting); unique sentences embedded once."""
    _evaluate("sts", recipe, model, data_dir, tasks, limit, batch_size, output, markdown, progress, device=device,
              spread=spread_mode(spread, spread_by), hub=hub, backend=backend, resume=resume)


@eval_app.command("transfer")
def eval_transfer(
    recipe: list[str] = RECIPES_OPT,
    model: str = MODEL_OPT,
    device: Optional[str] = DEVICE_OPT,
    backend: str = BACKEND_OPT,
    data_dir: Optional[list[Path]] = DATA_OPT,
    tasks: str = typer.Option("mr,cr,subj,mpqa,sst2,trec,mrpc", help="comma-separated transfer tasks"),
    limit: Optional[int] = LIMIT_OPT,
    spread: bool = SPREAD_OPT,
    spread_by: str = SPREAD_BY_OPT,
    batch_size: int = typer.Option(32, help="sentences per forward pass"),
    kfold: int = typer.Option(10, help="folds of the SentEval cross-validation"),
    n_jobs: int = typer.Option(1, help="parallel logistic-regression fits (joblib)"),
    standardize: bool = typer.Option(True, help="standardize features before the logistic regression (default; "
                                     "--no-standardize: SentEval's scikit-learn classifier on raw features)"),
    output: Optional[Path] = OUT_OPT,
    markdown: Optional[Path] = MD_OPT,
    progress: bool = typer.Option(True, help="show progress bars"),
    resume: bool = RESUME_OPT,
) -> None:
    """Transfer: logistic regression on frozen embeddings (SentEval protocol), accuracy x100."""
    _evaluate("transfer", recipe, model, data_dir, tasks, limit, batch_size, output, markdown, progress, kfold, n_jobs,
              device=device, spread=spread_mode(spread, spread_by), backend=backend, standardize=standardize,
              resume=resume)


def sweep(
    recipe: str = typer.Option(..., "--recipe", "-r", callback=required, help="recipe whose prompt/placeholder/pooling are swept"),
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
    baseline: bool = typer.Option(True, help="also sweep the exit layer with no TP (one more pass)"),
    own_schedule: bool = typer.Option(False, "--own-schedule", help="sweep the exit layer of the recipe's own TP "
                                      "schedule (several spans, resume) instead of a grid of TP [start, k)"),
    batch_size: int = typer.Option(32, help="sentences per forward pass"),
    memory_gb: float = typer.Option(1.0, help="memory for the pooled reads of one chunk of pairs (pair cosines are "
                                    "all that is kept between chunks)"),
    out_dir: Path = typer.Option(Path("sweep-out"), "--out-dir", "-o", help="folder for sweep.json, heatmap.png, best.yaml"),
    progress: bool = typer.Option(True, help="show progress bars"),
    vary: Optional[list[str]] = typer.Option(None, help="also grid over recipe fields, FIELD=V1,V2 (repeatable; e.g. "
                                             "edits.layers=3,5,7 edits.factor=0.5,2): one sweep per combination, "
                                             "written to OUT_DIR/variants.{json,md} and curves.png"),
) -> None:
    """Grid over TP stop layer k (and start, alpha) x exit layer M: every M from one pass per TP row."""
    from .api import as_recipe, resolve_model
    from .evaluation import load_task
    from .sweep import run_sweep, write_outputs
    from .variants import check_swept, parse_vary, run_variants, variants

    _split_tasks(task, "sts")
    grid = parse_vary(vary or [])
    if grid:
        check_swept(grid, own_schedule)
        variants(as_recipe(recipe), grid)  # every variant is a valid recipe before any model is loaded
    pairs = load_task(task, data_dirs(data_dir, hub), limit, spread_mode(spread, spread_by), hub)
    with quiet(not progress):
        hf_model, tok, _ = resolve_model(model, device=device)
    kw = dict(stops=parse_ints(stops) if stops else None, starts=parse_ints(starts), alphas=parse_floats(alphas),
              baseline=baseline, tokenizer=tok, batch_size=batch_size, progress=progress, model_name=model,
              backend=backend, memory_gb=memory_gb, own_schedule=own_schedule)
    if grid:
        found = run_variants(hf_model, as_recipe(recipe), grid, pairs, **kw)
        typer.echo(found.table(), nl=False)
        k, b = found.best()
        typer.echo(f"best: {found.labels[k]}, {b} on {found.sweeps[k].task} ({found.sweeps[k].n_pairs} pairs)")
        for k, p in found.write(out_dir).items():
            typer.echo(f"wrote {k}: {p}")
        return
    res = run_sweep(hf_model, recipe, pairs, **kw)
    paths = write_outputs(res, out_dir)
    typer.echo(f"best: {res.best()} on {res.task} "
               f"({res.n_pairs} pairs, {len(res.rows)} rows, {res.extra['layer_forwards_per_batch']} of "
               f"{res.extra['layer_forwards_per_batch_unshared']} layer forwards per batch, {res.seconds:.1f} s)")
    for k, p in paths.items():
        typer.echo(f"wrote {k}: {p}")


def regress(
    results: Path = typer.Argument(..., help="results JSON (tpsurgery eval ... --output)"),
    expected: Path = typer.Argument(..., help="expected-scores JSON (read; written with --write-expected)"),
    tol: Optional[float] = typer.Option(None, help="allowed drop in score points (default: the file's tol, else 0.5)"),
    strict: bool = typer.Option(False, help="also fail when a score rose by more than tol"),
    write_expected: bool = typer.Option(False, "--write-expected", help="write EXPECTED from the scores in RESULTS "
                                        "(pin today's scores for CI; with --tol as its tolerance) instead of comparing"),
    with_hash: bool = typer.Option(False, "--with-hash", help="with --write-expected: also pin each recipe's hash "
                                   "(a changed recipe then fails as 'mismatch')"),
    interval: bool = typer.Option(False, "--interval", help="tolerance from the results' bootstrap 95% interval: "
                                  "a regression when the expected score lies above the interval (tol where a run "
                                  "has none)"),
) -> None:
    """Compare results with expected scores: exit code 1 on a regression, 2 on an unreadable or malformed file."""
    import json

    from .evaluation import read_results
    from .regression import DEFAULT_TOL, compare, expected_from_runs, failed, load_expected, report
    from .textio import atomic_write, check_output

    runs = read_results(results)
    if write_expected:
        check_output(expected, results, what="expected file")
        doc = expected_from_runs(runs, tol=DEFAULT_TOL if tol is None else tol, with_hash=with_hash)
        atomic_write(expected, json.dumps(doc, indent=1) + "\n")
        typer.echo(f"wrote {expected}: {sum(len(e['scores']) for e in doc['expected'].values())} score(s) of "
                   f"{len(doc['expected'])} recipe(s), tol {doc['tol']}")
        return
    if with_hash:
        raise InputError(None, "--with-hash only goes with --write-expected")
    checks = compare(runs, load_expected(expected), tol, strict, interval=interval)
    typer.echo(report(checks))
    raise typer.Exit(1 if failed(checks) else 0)
