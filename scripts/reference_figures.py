"""Reproduce the core issue's reference figures on STS-B dev (SmolLM2-135M-Instruct, float32) in one command.

    python scripts/reference_figures.py [--data-dir ../shared/data/senteval] [--only NAME ...] [--json out.json]

Each setting is one all-layer pass (every exit layer from the same forward), so the table shows hidden_states[30]
and [28] and the best exit layer per setting. Prints a markdown table (docs/reference-figures.md holds its output).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import tpsurgery
from tpsurgery.data import load_stsb
from tpsurgery.evaluation import cosine, spearman100

P = 'This sentence : <PST> "{text}" means in one word:"'
SETTINGS = {
    "PromptEOL": (dict(prompt='This sentence : "{text}" means in one word:"'), None),
    "TP [0,1)": (dict(prompt=P, tp={"start": 0, "stop": 1}), None),
    "TP [1,2), token id 0": (dict(prompt=P, tp={"start": 1, "stop": 2}), None),
    "TP [1,2), zeros": (dict(prompt=P, tp={"start": 1, "stop": 2}, placeholder={"init": "zeros"}), None),
    "TP [1,4), token id 0": (dict(prompt=P, tp={"start": 1, "stop": 4}), None),
    "TP [1,2), ones": (dict(prompt=P, tp={"start": 1, "stop": 2}, placeholder={"init": "ones"}), None),
    "TP [1,2), uniform": (dict(prompt=P, tp={"start": 1, "stop": 2}, placeholder={"init": "uniform"}), None),
    "TP [1,2), gaussian": (dict(prompt=P, tp={"start": 1, "stop": 2}, placeholder={"init": "gaussian"}), None),
    "TP [1,2), space token": (dict(prompt=P, tp={"start": 1, "stop": 2}, placeholder={"init": "token", "token": " "}),
                              None),
    "TP [1,2), official compat": ("smollm2-prompteol-tp-official", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/senteval"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="torch device for the model (e.g. cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_stsb([Path(args.data_dir)], "dev")
    model, tok = tpsurgery.load_model(args.model, device=args.device)
    texts = list(dict.fromkeys(data.a + data.b))
    where = {t: i for i, t in enumerate(texts)}
    out = {}
    print(f"STS-B dev: {len(data)} pairs, {len(texts)} unique sentences")
    print("| setting | hidden_states[30] | hidden_states[28] | best exit |\n|---|---|---|---|")
    for name, (rec, _) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        recipe = tpsurgery.as_recipe(rec).replace(exit_layer=-1)
        t0 = time.time()
        emb = tpsurgery.apply(model, recipe, tokenizer=tok).encode(texts, batch_size=32, all_layers=True)
        a = emb[[where[t] for t in data.a]]
        b = emb[[where[t] for t in data.b]]
        scores = spearman100(cosine(a, b), data.gold)
        best = int(np.nanargmax(scores))
        out[name] = {"scores": [float(s) for s in scores], "seconds": time.time() - t0}
        print(f"| {name} | {scores[30]:.2f} | {scores[28]:.2f} | {scores[best]:.2f} at [{best}] |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
