"""``tpsurgery analyze``: the paper's analyses (:mod:`tpsurgery.analyze`) as commands that write PNG + JSON + a
markdown table.

>>> from typer.testing import CliRunner
>>> CliRunner().invoke(analyze_app, ["dependency", "--help"]).exit_code
0
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_eval import DEVICE_OPT, MODEL_OPT, data_dirs, required
from .errors import InputError

analyze_app = typer.Typer(help="The paper's analyses on a recipe (PNG + JSON + markdown table).", no_args_is_help=True)

RECIPE = typer.Option(..., "--recipe", "-r", callback=required, help="recipe YAML file or shipped recipe name")
INPUT = typer.Option(None, "--input", "-i", help="text file, one sentence per line (instead of STS-B)")
DATA = typer.Option(None, "--data-dir", help="SentEval-layout data folder for STS-B sentences (default: "
                    "$TPSURGERY_DATA)")
SPLIT = typer.Option("dev", "--split", help="STS-B split the sentences come from: dev or test (or train)")
LIMIT = typer.Option(200, "--limit", "-n", help="number of sentences: the first sentence of N STS-B pairs spread "
                     "evenly over the file (every genre), or the first N lines of --input")
OUT = typer.Option(Path("analysis"), "--output", "-o", help="folder for <stem>.json, <stem>.png and <stem>.md")
STEM = typer.Option(None, "--name", help="file stem (default: the analysis and the recipe's name)")
BATCH = typer.Option(16, "--batch-size", help="sentences per trace")


def _texts(input: Optional[Path], data_dir: Optional[list[Path]], split: str, limit: int) -> tuple[list[str], str]:
    """The sentences and a description of where they came from."""
    if limit < 1:
        raise InputError(None, f"--limit must be at least 1, got {limit}")
    if input is not None:
        from .textio import iter_lines

        lines = [t for t in iter_lines(input) if t.strip()][:limit]
        return lines, f"{input} (first {len(lines)} non-empty lines)"
    from .data import load_stsb, spread

    pairs = load_stsb(data_dirs(data_dir), split)
    part = spread(pairs, min(limit, len(pairs)))
    return list(part.a), f"STS-B {split}: first sentence of {len(part)} of {len(pairs)} pairs, evenly spread in file order"


def parse_layers(text: str) -> list[int]:
    """``"4,8,-3"`` -> ``[4, 8, -3]`` (hidden_states indices; negative ones count from the end).

    >>> parse_layers("4, 8,-3")
    [4, 8, -3]
    """
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(None, f"--layers: expected integers like '4,8,-3', got {text!r}") from None


def _write(out: Path, stem: str, report: dict[str, Any], table: str, plot: Any) -> None:
    from .textio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(report, indent=1).encode())
    atomic_write(out / f"{stem}.md", (f"`{report['command']}`\n\n" + table).encode())
    plot(report, out / f"{stem}.png")
    typer.echo(table)
    typer.echo(f"wrote {out / stem}.json, .md, .png")


def _meta(model: str, texts: list[str], source: str, recipes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"command": "tpsurgery " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "model": model,
            "texts": source, "n_texts": len(texts),
            "recipes": {label: {"name": r.name, "hash": r.hash()} for label, r in recipes.items()}, **extra}


@analyze_app.command("dependency")
def dependency(
    recipe: str = RECIPE,
    baseline: Optional[str] = typer.Option(None, "--baseline", help="the recipe to compare with (default: the recipe "
                                           "without its tp section)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="hidden_states indices, e.g. '4,8,16,28' or '-3' "
                                         "(default: a quarter, half and three quarters of the depth, and the exit "
                                         "layer)"),
    model: str = MODEL_OPT, device: Optional[str] = DEVICE_OPT, input: Optional[Path] = INPUT,
    data_dir: Optional[list[Path]] = DATA, split: str = SPLIT, limit: int = LIMIT, output: Path = OUT,
    name: Optional[str] = STEM, batch_size: int = BATCH,
) -> None:
    """The paper's Figure 5: per sentence, the Spearman correlation between the last token's hidden state and every
    other sentence token's (averaged), at chosen layers, for the recipe and the same recipe without TP: a box plot."""
    from .analyze import dependency_plot, dependency_report, dependency_scores, dependency_table, without_tp
    from .api import apply, resolve_model
    from .library import load_recipe

    texts, source = _texts(input, data_dir, split, limit)
    hf, tok, _ = resolve_model(model, device=device)
    main = load_recipe(recipe)
    other = load_recipe(baseline) if baseline else without_tp(main)
    labels = {main.name or "recipe": main, other.name or "baseline": other}
    if len(labels) < 2:
        raise InputError(None, "the recipe and the baseline have the same name; give the baseline another name")
    scores = {}
    for label, r in labels.items():
        emb = apply(hf, r, tokenizer=tok)
        n = emb.n_layers
        js = [j if j >= 0 else n + 1 + j for j in parse_layers(layers)] if layers else \
            sorted({n // 4, n // 2, 3 * n // 4, emb.plan.exit_layer} - {0})
        scores[label] = dependency_scores(emb, texts, js, batch_size)
        emb.close()
    report = dependency_report(scores, _meta(model, texts, source, labels))
    _write(output, name or f"dependency-{main.name or 'recipe'}", report, dependency_table(report), dependency_plot)


@analyze_app.command("attention")
def attention(
    recipe: str = RECIPE,
    with_recipe: Optional[list[str]] = typer.Option(None, "--with", help="more recipes to show beside it (e.g. one "
                                                    "with Contrastive Prompting's edit on); repeatable"),
    no_tp: bool = typer.Option(False, "--without-tp", help="also show the recipe without its tp section (where TP "
                               "acts: the difference)"),
    model: str = MODEL_OPT, device: Optional[str] = DEVICE_OPT, input: Optional[Path] = INPUT,
    data_dir: Optional[list[Path]] = DATA, split: str = SPLIT, limit: int = LIMIT, output: Path = OUT,
    name: Optional[str] = STEM, batch_size: int = BATCH,
) -> None:
    """Attention mass on <PST> per decoder layer and head, from sentence-token queries and from the last token's:
    a heatmap per recipe (eager attention probabilities, saved inside the recipe's trace)."""
    from .analyze import attention_mass, attention_plot, attention_report, attention_table, without_tp
    from .api import apply, resolve_model
    from .library import load_recipe

    texts, source = _texts(input, data_dir, split, limit)
    hf, tok, _ = resolve_model(model, device=device)
    recipes = [load_recipe(r) for r in [recipe, *(with_recipe or [])]]
    if no_tp:
        recipes.insert(1, without_tp(recipes[0]))
    labels = {(r.name or f"recipe {k}"): r for k, r in enumerate(recipes)}
    if len(labels) < len(recipes):
        raise InputError(None, "two recipes have the same name; give each its own name")
    masses = {}
    for label, r in labels.items():
        emb = apply(hf, r, tokenizer=tok)
        masses[label] = attention_mass(emb, texts, batch_size)
        emb.close()
    report = attention_report(masses, _meta(model, texts, source, labels, attention="eager"))
    _write(output, name or f"attention-{recipes[0].name or 'recipe'}", report, attention_table(report), attention_plot)
