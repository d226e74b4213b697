"""One 1 MB line truncated to SmolLM2's limit (8,192 tokens): tpsurgery's prompts.encode_prompts against the plain
binary search over character prefixes that it replaced (issue 23 item 12; see docs/reliability.md).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/long_line.py [--rounds 3]

Both give the same row (checked). The binary search re-tokenizes the prompt ~log2(characters) times; encode_prompts
tokenizes the character-bounded line once and then one batch of cuts near the one its offsets suggest. Times are
medians over rounds, in alternating order; the ratio is the median of the per-round ratios. Not part of the tests.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import tpsurgery
from tpsurgery.prompts import Encoded, char_bound, encode_prompts

P = 'This sentence : <PST> "{text}" means in one word:"'
WORDS = ("the", "a", "cat", "sat", "on", "mat", "running", "quickly", "tokenization", "é", "42", "over")


def binary_search(tok, template, text, max_length, compat):
    """The code before the change: the longest prefix found by bisection, each probe a full tokenization."""
    text = text[: char_bound(tok, max_length)]

    def enc(t):
        return encode_prompts(tok, template, [t], 0, preprocess=False, compat=compat)[0]

    lo, hi = 0, len(text)
    if len(enc(text).ids) <= max_length:
        return enc(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(enc(text[:mid]).ids) <= max_length else (lo, mid - 1)
    e = enc(text[:lo])
    return Encoded(e.ids, e.placeholders, e.text_span, truncated=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model, tok = tpsurgery.load_model("smollm2-135m")
    limit = tpsurgery.apply(model, {}, tokenizer=tok).max_length  # the model's limit
    rng = random.Random(0)
    lines = {"words": " ".join(rng.choice(WORDS) for _ in range(250_000))[:1_000_000], "digits": "0" * 1_000_000}
    char_bound(tok, limit)  # the vocabulary scan is cached per tokenizer: not part of either side
    for (kind, line), compat in [(x, c) for x in lines.items() for c in ("exact", "official")]:
        times: dict[str, list[float]] = {"encode_prompts": [], "binary search": []}
        rows = {}
        for r in range(args.rounds):
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for name in order:
                t0 = time.perf_counter()
                if name == "encode_prompts":
                    rows[name] = encode_prompts(tok, P, [line], 0, preprocess=False, max_length=limit, compat=compat,
                                                warn=False)[0]
                else:
                    rows[name] = binary_search(tok, P, line, limit, compat)
                times[name].append(time.perf_counter() - t0)
        assert rows["encode_prompts"] == rows["binary search"] and len(rows["encode_prompts"].ids) <= limit
        ratio = statistics.median(b / a for a, b in zip(times["encode_prompts"], times["binary search"]))
        print(f"1 MB of {kind}, compat={compat}, limit {limit}: encode_prompts "
              f"{statistics.median(times['encode_prompts']):.2f} s, binary search "
              f"{statistics.median(times['binary search']):.2f} s, ratio {ratio:.1f}x", flush=True)


if __name__ == "__main__":
    main()
