"""Sweep benchmark: rows that share their first layers run them once (``share_layers``) vs every row on its own.

    python benchmarks/sweep_sharing.py                    # SmolLM2-135M, CPU float32, 1 thread, 48 STS-B dev pairs
    python benchmarks/sweep_sharing.py --pairs 96 --rounds 3 --stops 2-30

Prints the median (over interleaved rounds) of the per-round time ratio shared / unshared, the decoder-layer-forward
ratio that bounds it, and checks that both sweeps give the same scores. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tpsurgery  # noqa: E402
from tpsurgery.data import PairSet, load_stsb  # noqa: E402
from tpsurgery.sweep import run_sweep  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="smollm2-prompteol-tp")
    ap.add_argument("--pairs", type=int, default=48, help="first N STS-B dev pairs")
    ap.add_argument("--stops", default="2-30", help="TP stop layers k, as lo-hi (inclusive); start is 1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lo, hi = (int(x) for x in args.stops.split("-"))
    dev = load_stsb([ROOT.parent / "shared/data/senteval"], "dev")
    n = args.pairs
    pairs = PairSet(dev.name, dev.a[:n], dev.b[:n], dev.gold[:n], dev.subset[:n], dev.files)
    model, tok = tpsurgery.load_model(args.model, device=args.device)
    kw = dict(stops=list(range(lo, hi + 1)), tokenizer=tok, batch_size=args.batch_size)
    times: dict[bool, list[float]] = {True: [], False: []}
    res = {}
    for r in range(args.rounds):
        for share in ((True, False) if r % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            res[share] = run_sweep(model, args.recipe, pairs, share_layers=share, **kw)
            times[share].append(time.perf_counter() - t0)
            print(f"round {r + 1}: share_layers={share} {times[share][-1]:.1f} s", file=sys.stderr, flush=True)
    ratio = statistics.median(a / b for a, b in zip(times[True], times[False]))
    work = res[True].extra
    same = max(abs((x or 0) - (y or 0)) for ra, rb in zip(res[True].rows, res[False].rows)
               for x, y in zip(ra["scores"], rb["scores"]))
    out = {"model": args.model, "pairs": n, "rows": len(res[True].rows), "stops": args.stops, "threads": args.threads,
           "device": args.device, "batch_size": args.batch_size, "rounds": args.rounds,
           "seconds_shared": [round(t, 2) for t in times[True]], "seconds_unshared": [round(t, 2) for t in times[False]],
           "time_ratio_shared_over_unshared": round(ratio, 4),
           "layer_forward_ratio": round(work["layer_forwards_per_batch"] / work["layer_forwards_per_batch_unshared"], 4),
           "max_score_difference": same}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
