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
import statistics
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


def plan_costs(model, tok, pairs, repeats: int = 3) -> dict:
    """Seconds (best of ``repeats``) of one plan run from layer 0, and of a second plan resumed at layer 2 from the
    first's kept state (TP [1, 2) then TP [1, 3)), for the prompt alone and with CP (its auxiliary-run capture)."""
    from tpsurgery.sharing import encode_schedules, layer_runs

    texts = list(dict.fromkeys([*pairs.a, *pairs.b]))
    out = {}
    for name, text in (("tp", RECIPE.split("runs:")[0]), ("tp_cp", RECIPE)):
        r = tpsurgery.parse_recipe(text)
        emb = tpsurgery.apply(model, r.replace(tp={}, exit_layer=-1), tokenizer=tok)
        pa, pb = (emb.plan_for(r.replace(tp={"start": 1, "stop": k}, exit_layer=-1)) for k in (2, 3))

        def best(plans, share):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                encode_schedules(emb, texts, plans, share_layers=share, show_progress_bar=False)
                runs.append(time.perf_counter() - t0)
            return min(runs)

        one, shared, alone = best([pa], False), best([pa, pb], True), best([pa, pb], False)
        out[name] = {"texts": len(texts), "from_layer_0": round(one, 3), "layers": pa.layers_run,
                     "resumed": round(shared - one, 3), "resumed_layers": layer_runs([pa, pb]) - pa.layers_run,
                     "second_from_layer_0": round(alone - one, 3)}
    return out


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
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds (interleaved); ratios are per-round medians")
    ap.add_argument("--costs", action="store_true", help="also time one plan from layer 0, a plan resumed at layer "
                    "2, with and without CP's auxiliary run (where the time of a shared grid goes)")
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

    modes = {"joint": lambda: grid_cosines(model, recipe, pairs, vary=vary, share_layers=True, **kw),
             "per_variant": lambda: [run_sweep(model, v, pairs, **kw) for _, v in variants(recipe, vary)],
             "unshared": lambda: grid_cosines(model, recipe, pairs, vary=vary, share_layers=False, **kw)}
    emb.encode(list(pairs.a[:2]))  # warm-up: the first run of a process pays for lazy imports and allocations
    times: dict[str, list[float]] = {m: [] for m in modes}
    found: dict[str, object] = {}
    for r in range(args.rounds):  # interleaved: round 2 runs the modes in reverse order
        for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            t0 = time.perf_counter()
            found[mode] = modes[mode]()
            times[mode].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {mode} {times[mode][-1]:.1f} s", file=sys.stderr, flush=True)
    joint, per, alone = found["joint"], found["per_variant"], found["unshared"]
    forwards = {"joint": joint.work["layer_forwards_per_batch"],
                "per_variant": sum(x.extra["layer_forwards_per_batch"] for x in per),
                "unshared": alone.work["layer_forwards_per_batch"]}
    ratio = {m: round(statistics.median(a / b for a, b in zip(times[m], times["unshared"])), 4)
             for m in ("joint", "per_variant")}
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
           "rounds": args.rounds, "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
           "time_ratio_joint_over_unshared": ratio["joint"],
           "time_ratio_per_variant_over_unshared": ratio["per_variant"],
           **({"per_plan_costs": plan_costs(model, tok, pairs)} if args.costs else {}),
           "max_cosine_difference_joint_vs_unshared": float(np.max(np.abs(joint.cos - alone.cos)))}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
