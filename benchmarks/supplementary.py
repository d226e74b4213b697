"""Two targeted re-measurements quoted in docs/performance.md (not part of the main run).

    python benchmarks/supplementary.py overhead --n 200     # engine vs hooks, batch 1, paired call by call
    python benchmarks/supplementary.py exit --rounds 5      # exit hidden_states[20] vs [30], batch 32, SmolLM2

Pairing call by call (overhead) or many short rounds (exit) keeps contention from other jobs out of the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tpsurgery  # noqa: E402
from hooks import HookBackend  # noqa: E402
from run import EXIT, recipe, sentences  # noqa: E402


def overhead(n: int) -> None:
    from tpsurgery.testing import tiny_model

    for label, (m, tok) in [("tiny-llama-30L-h64", tiny_model("llama", n_layers=30, hidden=64)),
                            ("smollm2-135m", tpsurgery.load_model("smollm2-135m"))]:
        texts = sentences(n)
        tp = recipe("smollm2-prompteol-tp", exit_layer=EXIT)
        eng = tpsurgery.apply(m, tp, tokenizer=tok, prefix_cache=False)
        hk = tpsurgery.apply(m, tp, tokenizer=tok, prefix_cache=False)
        hk.backend = HookBackend(m)
        eng.encode(texts[:2]), hk.encode(texts[:2])
        diffs, ratios = [], []
        for i, t in enumerate(texts):
            tt = {}
            for name, e in ((("eng", eng), ("hk", hk)) if i % 2 == 0 else (("hk", hk), ("eng", eng))):
                t0 = time.perf_counter()
                e.encode(t)
                tt[name] = time.perf_counter() - t0
            diffs.append((tt["eng"] - tt["hk"]) * 1e3)
            ratios.append(tt["eng"] / tt["hk"])
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        print(f"{label}: batch 1, {len(diffs)} paired calls: engine - hooks median {statistics.median(diffs):.3f} ms "
              f"(IQR {q1:.3f}..{q3:.3f}), engine / hooks median {statistics.median(ratios):.3f}")


def exit_ratio(rounds: int, n: int) -> None:
    m, tok = tpsurgery.load_model("smollm2-135m")
    texts = sentences(n)
    peol = recipe("smollm2-prompteol", exit_layer=EXIT)
    v = {f"{k}{'' if pc else '_nopfx'}": tpsurgery.apply(m, peol.replace(exit_layer=x), tokenizer=tok, prefix_cache=pc)
         for pc in (True, False) for k, x in (("x20", 20), ("full", -1))}
    for e in v.values():
        e.encode(texts[:2])
    t: dict[str, list[float]] = {k: [] for k in v}
    for _ in range(rounds):
        for k, e in v.items():
            t0 = time.perf_counter()
            e.encode(texts, batch_size=32)
            t[k].append(time.perf_counter() - t0)
    for sfx in ("", "_nopfx"):
        r = statistics.median(a / b for a, b in zip(t["x20" + sfx], t["full" + sfx]))
        print(f"exit 20 / full (prefix reuse {'off' if sfx else 'on'}): {r:.3f} over {rounds} rounds of {n} sentences")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["overhead", "exit"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "overhead":
        overhead(args.n or 200)
    else:
        exit_ratio(args.rounds, args.n or 64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
