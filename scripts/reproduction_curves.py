"""Spearman x100 against exit layer M for rows of stored sweeps (tpsurgery sweep ... -o DIR writes DIR/sweep.json).

    python scripts/reproduction_curves.py -o docs/figures/smollm2-exit-curves.png \
        "PromptEOL=docs/figures/smollm2-sweep.json:no TP (placeholder hidden)" \
        "PromptEOL+TP [1,2)=docs/figures/smollm2-sweep.json:TP [1,2)" \
        "PromptEOL+TP [1,8) (paper's span)=docs/figures/smollm2-sweep.json:TP [1,8)"

Each curve is NAME=SWEEP_JSON:ROW_LABEL, or NAME=VARIANTS_JSON:VARIANT_LABEL[/ROW_LABEL] for the variants.json of
``tpsurgery sweep --vary`` (the row may be left out when the variant's sweep has one row); the best exit layer of
each curve is marked. docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row_scores(path: Path, label: str) -> tuple[dict, list]:
    """``(sweep, scores by exit layer)`` of one row of a sweep.json or of one variant of a variants.json."""
    found = json.loads(path.read_text(encoding="utf-8"))
    sweep = found
    if "variants" in found:
        name, _, label = label.partition("/")
        by_name = {v["label"]: v for v in found["variants"]}
        if name not in by_name:
            raise SystemExit(f"{path} has no variant {name!r}; variants: {', '.join(by_name)}")
        sweep = by_name[name]
        if not label and len(sweep["rows"]) == 1:
            label = sweep["rows"][0]["label"]
    rows = {r["label"]: r["scores"] for r in sweep["rows"]}
    if label not in rows:
        raise SystemExit(f"{path} has no row {label!r}; rows: {', '.join(rows)}")
    return sweep, rows[label]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curves", nargs="+", help="NAME=SWEEP_JSON:ROW_LABEL")
    ap.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    title = args.title
    for spec in args.curves:
        head, sep, label = spec.partition(".json:")
        name, _, path = (head + sep[:-1]).rpartition("=")  # names and labels may hold '=' and ':', paths end in .json
        if not sep or not name:
            raise SystemExit(f"{spec!r}: want NAME=FILE.json:LABEL")
        sweep, scores = row_scores(Path(path), label)
        xs = [m for m, s in enumerate(scores) if s is not None]
        ys = [scores[m] for m in xs]
        best = max(range(len(ys)), key=ys.__getitem__)
        (line,) = ax.plot(xs, ys, marker=".", label=f"{name}: best {ys[best]:.2f} at M={xs[best]}")
        ax.plot([xs[best]], [ys[best]], marker="o", markersize=9, fillstyle="none", color=line.get_color())
        title = title or f"{sweep['task']} ({sweep['n_pairs']} pairs), {Path(str(sweep['model'])).name}"
    ax.set_xlabel("exit layer M = hidden_states[M] (0 = embedding output, M = output of decoder layer M-1)")
    ax.set_ylabel("Spearman x100")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
