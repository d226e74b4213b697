"""Engine cost against the model's own cost, per model shape (docs/performance.md, "Shape benchmark").

    python benchmarks/shapes.py                                   # CPU: tiny 30-layer Llama, SmolLM2 (real weights)
    python benchmarks/shapes.py --device cuda --dtype bfloat16 --shapes smollm2,llama-1b,llama-7b \\
        --batch-sizes 64,1 --n 1024 --n1 64                       # GPU: random-weight Llama shapes, nothing downloaded

Every variant embeds the same STS-B dev sentences with PromptEOL, exit ``hidden_states[n - 5]`` (n = decoder layers),
prefix reuse off everywhere, tokenization included in every time:

* ``bare``: the limit. The fast tokenizer on the prompted strings, rows sorted by length, left-padded batches, then a
  plain PyTorch loop: embeddings -> rotary -> causal mask -> ``layers[:M]`` -> last row. No hooks, no tracing.
* ``naive``: the same batches through the whole HF forward with ``output_hidden_states=True`` (LM head included).
* ``peol`` / ``tp``: tpsurgery's ``encode`` of PromptEOL / PromptEOL + TP before layers [1, 8).
* ``half`` / ``full``: tpsurgery PromptEOL exiting at ``hidden_states[n // 2]`` / ``hidden_states[n]`` (final norm).

``bare`` and ``naive`` run on their own deep copy of the model (tpsurgery on another; both copies are fresh
allocations, so a file-backed loaded model does not favour one side): nnsight puts a forward wrapper on every module of the model it
traces, and those cost time outside a trace too. Variants run interleaved in rounds (rotating order); each ratio is the
median over rounds of the per-round ratio. Times are process CPU time on the CPU (robust to other jobs on a shared
machine; with one torch thread nothing overlaps) and wall time with ``torch.cuda.synchronize`` on CUDA.
A last, untimed round measures peak memory (exact on CUDA; sampled process RSS on the CPU, indicative only).
Shapes: ``tiny`` (byte tokenizer), ``smollm2-real`` (the shipped weights), and random-weight Llama configs with the
SmolLM2 tokenizer: ``smollm2`` (576 x 30), ``llama-1b`` (2048 x 16, Llama 3.2 1B), ``llama-7b`` (4096 x 32, Llama-2-7B).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tpsurgery  # noqa: E402
from run import PeakMemory, report, sentences  # noqa: E402
from tpsurgery.prompts import preprocess_sentence  # noqa: E402

PROMPT = 'This sentence : "{text}" means in one word:"'
PROMPT_TP = 'This sentence : <PST> "{text}" means in one word:"'
EXIT = -6  # hidden_states[n - 5]
LLAMA = {  # hidden, intermediate, layers, heads, kv heads, vocab (the real models' shapes)
    "smollm2": (576, 1536, 30, 9, 3, 49152),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
}
TARGETS = {"peol / bare": None, "naive / peol": 1.0, "tp / peol": 1.05, "half / full": 0.55}


def build(shape: str, dtype: torch.dtype, device: str, smol: tuple) -> tuple:
    """``(model, tokenizer)`` for a shape; random weights except ``smollm2-real``."""
    if shape == "tiny":
        from tpsurgery.testing import tiny_model

        m, tok = tiny_model("llama", n_layers=30, hidden=64, dtype=dtype)
        return m.to(device).eval(), tok
    if shape == "smollm2-real":
        return smol[0].to(device, dtype).eval(), smol[1]
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = LLAMA[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048,
                      tie_word_embeddings=shape != "llama-7b", pad_token_id=smol[1].pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM._from_config(cfg, dtype=dtype)  # initialized on the device (std 0.02 normals)
    return m.eval(), smol[1]


class Bare:
    """The limit: a plain loop over ``layers[:M]`` of a Llama-family model on left-padded batches."""

    def __init__(self, model, tok, exit_layer: int, full: bool = False):
        self.model, self.tok, self.m, self.full = model, tok, exit_layer, full
        self.device = next(model.parameters()).device

    def batches(self, texts: list[str], batch_size: int):
        prompts = [PROMPT.replace("{text}", preprocess_sentence(t)) for t in texts]
        ids = self.tok(prompts, split_special_tokens=True)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for k in range(0, len(order), batch_size):
            idx = order[k: k + batch_size]
            w = len(ids[idx[0]])
            x = torch.full((len(idx), w), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), w), dtype=torch.long)
            for b, i in enumerate(idx):
                x[b, w - len(ids[i]):] = torch.tensor(ids[i])
                mask[b, w - len(ids[i]):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            yield idx, x.to(self.device), mask.to(self.device), pos.to(self.device)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int):
        import inspect

        from transformers.masking_utils import create_causal_mask

        # the cache keyword was renamed across transformers 5.x (past_key_values on 5.17, cache later)
        CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

        base = self.model.model
        out, where = [], []
        for idx, x, mask, pos in self.batches(texts, batch_size):
            if self.full:  # the naive way: every layer, the final norm and the LM head
                h = self.model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False,
                               output_hidden_states=True).hidden_states[self.m]
            else:
                h = base.embed_tokens(x)
                causal = create_causal_mask(config=base.config, inputs_embeds=h, attention_mask=mask,
                                            position_ids=pos, **{CACHE_KW: None})
                rope = base.rotary_emb(h, position_ids=pos)
                for layer in base.layers[: self.m]:
                    h = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
            out.append(h[:, -1].float())
            where.extend(idx)
        res = torch.empty((len(texts), out[0].shape[1]))
        res[torch.tensor(where)] = torch.cat(out).cpu()
        return res.numpy()


def variants(model, tok, bare_model) -> dict:
    n = model.config.num_hidden_layers
    m = n - 5
    ap = lambda prompt, **kw: tpsurgery.apply(  # noqa: E731
        model, tpsurgery.parse_recipe(json.dumps({"prompt": prompt, **kw})), tokenizer=tok, prefix_cache=False)
    return {
        "bare": Bare(bare_model, tok, m),
        "naive": Bare(bare_model, tok, m, full=True),
        "peol": ap(PROMPT, exit_layer=EXIT),
        "tp": ap(PROMPT_TP, exit_layer=EXIT, tp={"start": 1, "stop": min(8, m)}),
        "half": ap(PROMPT, exit_layer=n // 2),
        "full": ap(PROMPT, exit_layer=-1),
    }


def bench(label, model, bare_model, tok, device, batch_size, n, rounds, log) -> dict:
    texts = sentences(n)
    vs = variants(model, tok, bare_model)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    check = {k: vs[k].encode(texts[:batch_size * 2], batch_size=batch_size) for k in ("bare", "peol", "naive")}
    for v in vs.values():  # warm-up (nnsight compiles its trace body once per call site)
        v.encode(texts[:batch_size], batch_size=batch_size)
    times: dict[str, list[float]] = {k: [] for k in vs}
    names = list(vs)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = clock()
            vs[k].encode(texts, batch_size=batch_size)
            sync()
            times[k].append(clock() - t0)
        log(f"  [{label} b={batch_size}] round {r + 1}/{rounds}: " + " ".join(f"{k} {times[k][-1]:.2f}s" for k in names))
    mem = {}
    for k in names:
        with PeakMemory(device) as pm:
            vs[k].encode(texts, batch_size=batch_size)
        mem[k] = round(pm.peak, 1)

    syncs = count_syncs(vs, texts, batch_size) if device.startswith("cuda") else None

    def ratio(a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)

    scale = max(float(abs(check["bare"]).max()), 1e-6)
    return {
        "shape": label, "batch_size": batch_size, "sentences": n, "rounds": rounds,
        "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
        "ratios": {"peol / bare": ratio("peol", "bare"), "naive / peol": ratio("naive", "peol"),
                   "tp / peol": ratio("tp", "peol"), "half / full": ratio("half", "full")},
        "max_rel_diff_vs_bare": {k: float(abs(check[k] - check["bare"]).max()) / scale for k in ("peol", "naive")},
        "sentences_per_s": {k: round(n / statistics.median(v), 2) for k, v in times.items()},
        "peak_mem_mb": mem,
        "host_device_syncs_per_encode": syncs,
    }


def count_syncs(vs: dict, texts: list[str], batch_size: int) -> dict:
    """Host-device synchronizations of one encode per variant (``torch.cuda.set_sync_debug_mode``, CUDA only)."""
    import warnings

    out = {}
    for k in ("bare", "peol", "tp"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                vs[k].encode(texts, batch_size=batch_size)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out[k] = sum("synchroniz" in str(w.message) for w in seen)
    return out


def show(res: dict, target_bare: float) -> str:
    lines = [f"\n== {res['shape']} ({res['hidden']} x {res['layers']})  batch {res['batch_size']}  "
             f"({res['sentences']} sentences, {res['rounds']} rounds)"]
    for k, v in res["ratios"].items():
        t = target_bare if k == "peol / bare" else TARGETS[k]
        ok = v >= t if k == "naive / peol" else v <= t
        lines.append(f"  {k:<14} {v:7.3f}   target {'>=' if k == 'naive / peol' else '<='} {t:.2f}  "
                     f"{'OK' if ok else 'MISSED'}")
    lines.append("  max |diff| / max |bare|: " + ", ".join(f"{k} {v:.1e}" for k, v in res["max_rel_diff_vs_bare"].items()))
    lines.append("  sentences/s: " + ", ".join(f"{k} {v:.1f}" for k, v in res["sentences_per_s"].items()))
    lines.append("  peak MB:     " + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_mem_mb"].items()))
    if res["host_device_syncs_per_encode"]:
        lines.append("  host-device syncs per encode: " + ", ".join(
            f"{k} {v}" for k, v in res["host_device_syncs_per_encode"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,smollm2-real", help="tiny, smollm2-real, " + ", ".join(LLAMA))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-sizes", default="32,1")
    ap.add_argument("--n", type=int, default=128, help="sentences per variant at batch > 1")
    ap.add_argument("--n1", type=int, default=32, help="sentences per variant at batch 1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda"):  # CPU time counts the tokenizer's worker threads too; keep it serial
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    dtype = getattr(torch, args.dtype)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()
    t0 = time.time()
    smol = tpsurgery.load_model("smollm2-135m", dtype=dtype)
    results = []
    for shape in args.shapes.split(","):
        built, tok = build(shape, dtype, args.device, smol)
        # two copies with the same kind of memory (a loaded model's weights may be file-backed): nnsight wraps every
        # module of the model it traces, so the limit and the naive forward run on their own, unwrapped copy
        model, bare_model = copy.deepcopy(built), copy.deepcopy(built)
        del built
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            res = bench(shape, model, bare_model, tok, args.device, bs, args.n1 if bs == 1 else args.n, args.rounds, log)
            results.append(res)
            print(show(res, 1.25 if bs == 1 else 1.10), flush=True)
        del model, bare_model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    report(" ".join(["python", "benchmarks/shapes.py", *(argv if argv is not None else sys.argv[1:])]), args, t0,
           results, load_avg_start=load0, load_avg_end=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
