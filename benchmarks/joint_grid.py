"""Joint-grid benchmark (issue 25 item 1): a TP-stop x CP-layer x CP-factor x exit grid, how much the engine shares.

    python benchmarks/joint_grid.py                          # tiny random Llama, 30 layers (SmolLM2's depth), 16 pairs
    python benchmarks/joint_grid.py --smollm2 --pairs 16     # SmolLM2-135M, CPU float32, 1 thread

The grid: PromptEOL + <PST> + Contrastive Prompting (subtract the "irrelevant" run's last row at the o_proj input of
layer l, scale by C), TP [1, k) for k in --stops (plus the no-TP row) x l in --cp-layers x C in --factors x every
exit layer (exits are free: one all-layer pass reads them all). Three ways to compute it, each timed once:

* joint     - ``tpsurgery.tune.grid_cosines``: every variant's rows in ONE pass, rows and variants that agree on
              their first layers run them once (what ``tpsurgery tune`` does);
* per-variant - one ``run_sweep`` per (l, C) variant, TP rows shared inside it (what ``tpsurgery sweep --vary`` does);
* unshared  - every row of every variant on its own.

Printed: decoder-layer forwards per batch of each (counted from the plans, ``tpsurgery.sharing.layer_runs``), the
distinct-prefix lower bound (a trie of the plans' per-layer edits: what a grid costs if every distinct prefix runs
once), wall times, their ratios to unshared, and the largest cosine difference between joint and unshared (same
numbers expected). Not part of the test suite; numbers in docs name the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tpsurgery  # noqa: E402
from tpsurgery.data import PairSet, load_stsb  # noqa: E402
from tpsurgery.sharing import common_layers  # noqa: E402
from tpsurgery.sweep import grid, row_plans, run_sweep  # noqa: E402
from tpsurgery.testing import tiny_model  # noqa: E402
from tpsurgery.tune import grid_cosines  # noqa: E402
from tpsurgery.variants import variants  # noqa: E402

RECIPE = """name: joint-grid
prompt: 'This sentence : <PST> "{text}" means in one word:"'
tp: {start: 1, stop: 2}
runs:
  irrelevant: 'The irrelevant information of this sentence : "{text}" means in one word:"'
edits:
  - {site: attn_out_in, layers: 4, rows: last, op: subtract, run: irrelevant}
  - {site: attn_out_in, layers: 4, rows: last, op: scale, factor: 0.5}
exit_layer: -3
"""


def ints(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def prefix_bound(plans: list) -> int:
    """Decoder-layer forwards if every distinct prefix (the plans' edits up to a layer) ran once: inserting plan r
    into a trie adds ``layers_run - (its longest common prefix with an earlier plan)`` nodes."""
    total = 0
    for r, p in enumerate(plans):
        total += p.layers_run - max((common_layers(plans[q], p) for q in range(r)), default=0)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M instead of the tiny random model")
    ap.add_argument("--pairs", type=int, default=16, help="first N STS-B dev pairs")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers of the tiny model")
    ap.add_argument("--stops", default="2-8")
    ap.add_argument("--cp-layers", default="2,4,6,9")
    ap.add_argument("--factors", default="0.5,2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smollm2:
        model, tok = tpsurgery.load_model("smollm2-135m")
    else:
        model, tok = tiny_model("llama", n_layers=args.layers, hidden=32, seed=0)
    dev = load_stsb([ROOT.parent / "shared/data/senteval"], "dev")
    n = args.pairs
    pairs = PairSet(dev.name, dev.a[:n], dev.b[:n], dev.gold[:n], dev.subset[:n], dev.files)
    recipe = tpsurgery.parse_recipe(RECIPE)
    vary = {"edits.layers": ints(args.cp_layers), "edits.factor": [float(x) for x in args.factors.split(",")]}
    stops = ints(args.stops)
    kw = dict(stops=stops, tokenizer=tok, batch_size=args.batch_size, progress=False)

    emb = tpsurgery.apply(model, recipe.replace(tp={}, exit_layer=-1), tokenizer=tok)
    plans = []
    for _, v in variants(recipe, vary):
        plans += row_plans(emb, v, grid(v, emb.n_layers, stops))[1]
    plans.append(emb.plan_for(recipe))  # grid_cosines' baseline: the recipe itself
    bound = prefix_bound(plans)

    seconds, forwards = {}, {}
    t0 = time.perf_counter()
    joint = grid_cosines(model, recipe, pairs, vary=vary, share_layers=True, **kw)
    seconds["joint"], forwards["joint"] = time.perf_counter() - t0, joint.work["layer_forwards_per_batch"]
    t0 = time.perf_counter()
    per = [run_sweep(model, v, pairs, **kw) for _, v in variants(recipe, vary)]
    seconds["per_variant"] = time.perf_counter() - t0
    forwards["per_variant"] = sum(r.extra["layer_forwards_per_batch"] for r in per)
    t0 = time.perf_counter()
    alone = grid_cosines(model, recipe, pairs, vary=vary, share_layers=False, **kw)
    seconds["unshared"], forwards["unshared"] = time.perf_counter() - t0, alone.work["layer_forwards_per_batch"]
    base_forwards = plans[-1].layers_run  # per_variant runs no baseline plan: compare it with the grid's rows only
    out = {"model": "smollm2-135m" if args.smollm2 else f"tiny llama ({args.layers} layers, hidden 32)", "pairs": n,
           "stops": stops, "cp_layers": vary["edits.layers"], "factors": vary["edits.factor"],
           "variants": len(per), "rows_per_variant": len(per[0].rows), "plans": len(plans),
           "exits_per_row": emb.n_layers + 1, "cells": len(joint.cells), "threads": args.threads,
           "layer_forwards_per_batch": forwards, "distinct_prefix_bound": bound,
           "baseline_plan_forwards_unshared": base_forwards,
           "forward_ratio_joint_over_unshared": round(forwards["joint"] / forwards["unshared"], 4),
           "forward_ratio_per_variant_over_unshared_rows": round(
               forwards["per_variant"] / (forwards["unshared"] - base_forwards), 4),
           "forward_ratio_bound_over_unshared": round(bound / forwards["unshared"], 4),
           "seconds": {k: round(v, 2) for k, v in seconds.items()},
           "time_ratio_joint_over_unshared": round(seconds["joint"] / seconds["unshared"], 4),
           "time_ratio_per_variant_over_unshared": round(seconds["per_variant"] / seconds["unshared"], 4),
           "max_cosine_difference_joint_vs_unshared": float(np.max(np.abs(joint.cos - alone.cos)))}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
