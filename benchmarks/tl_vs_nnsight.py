"""TransformerLens backend vs nnsight backend: boot cost, time per sentence, agreement (see docs/backends.md).

    python benchmarks/tl_vs_nnsight.py [--n 64] [--rounds 5]

SmolLM2-135M (float32, CPU), the shipped PromptEOL+TP recipe, STS-B dev sentences. The two backends run in
alternating order each round; the ratio is the median of the per-round ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import sys

import torch

import tpsurgery
from tpsurgery.models import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import sentences  # noqa: E402  (one reader of the benchmark sentences)




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    texts = sentences(args.n)
    recipe = tpsurgery.load_recipe("smollm2-prompteol-tp")
    nn = tpsurgery.apply(model, recipe, tokenizer=tok, prefix_cache=False)
    t0 = time.perf_counter()
    tl = tpsurgery.apply(model, recipe, tokenizer=tok, backend="transformer_lens")
    boot = time.perf_counter() - t0
    a, b = (e.encode(texts, batch_size=args.batch_size, convert_to_tensor=True) for e in (nn, tl))  # warm-up
    rel = float((a - b).abs().max() / a.abs().max())
    ratios, times = [], {"nnsight": [], "transformer_lens": []}
    for r in range(args.rounds):
        order = (nn, tl) if r % 2 == 0 else (tl, nn)
        for e in order:
            t = time.perf_counter()
            e.encode(texts, batch_size=args.batch_size)
            times[e.backend.name].append((time.perf_counter() - t) / len(texts))
        ratios.append(times["transformer_lens"][-1] / times["nnsight"][-1])
    print(f"boot (apply with backend='transformer_lens', copy + bridge): {boot:.2f} s")
    for k, v in times.items():
        print(f"{k}: {1000 * statistics.median(v):.1f} ms/sentence (median of {args.rounds})")
    print(f"transformer_lens / nnsight time ratio: {statistics.median(ratios):.2f}")
    print(f"max relative difference of the embeddings: {rel:.2e}")


if __name__ == "__main__":
    main()
