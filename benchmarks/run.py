"""tpsurgery performance benchmark: ratios from one run on one machine (see docs/performance.md).

    python benchmarks/run.py                      # CPU, float32, SmolLM2-135M + a tiny 30-layer Llama, batch 1 and 32
    python benchmarks/run.py --device cuda --dtype bfloat16 --model smollm2-135m --no-tiny

Every variant embeds the same STS-B dev sentences. Variants are interleaved in rounds (rotating order) and each ratio
is the median over rounds of the per-round ratio, so drifting contention from other jobs hits both sides alike.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tpsurgery  # noqa: E402
from hooks import FullForwardBackend, HookBackend  # noqa: E402

SENTEVAL = ROOT.parent / "shared/data/senteval"
EXIT = -3  # hidden_states[28] of 30: the SmolLM2 PromptEOL(-TP) recipes' exit; every prompt variant uses it
HEAVY = ("ke_off", "ke_on", "meta_off", "meta_on")  # long prompts: fewer sentences (times are per sentence)


def sentences(n: int) -> list[str]:
    """The first ``n`` unique STS-B dev sentences, pair by pair, read by tpsurgery's own loader."""
    from tpsurgery.data import load_stsb

    dev = load_stsb([SENTEVAL], "dev")
    return list(dict.fromkeys(s for pair in zip(dev.a, dev.b) for s in pair))[:n]


def recipe(name: str, **changes):
    return tpsurgery.load_recipe(name).replace(**changes)


def variants(model, tok) -> dict[str, tpsurgery.Embedder]:
    """name -> embedder. Prompt variants exit at ``EXIT`` so that their ratios measure prompt length only."""
    ap = lambda r, **kw: tpsurgery.apply(model, r, tokenizer=tok, **{"prefix_cache": True, **kw})  # noqa: E731
    peol, tp = recipe("smollm2-prompteol", exit_layer=EXIT), recipe("smollm2-prompteol-tp", exit_layer=EXIT)
    v = {
        "peol": ap(peol),
        "peol_nopfx": ap(peol, prefix_cache=False),
        "tp": ap(tp),
        "tp_nopfx": ap(tp, prefix_cache=False),
        "tp_hooks": ap(tp, prefix_cache=False),
        "peol_x20": ap(peol.replace(exit_layer=20)),
        "peol_full": ap(peol.replace(exit_layer=-1)),
        "peol_hf": ap(peol.replace(exit_layer=-1), prefix_cache=False),
        "echo": ap(recipe("echo", exit_layer=EXIT)),
        "ke_on": ap(recipe("knowledge-tp", exit_layer=EXIT)),
        "ke_off": ap(recipe("knowledge-tp", exit_layer=EXIT), prefix_cache=False),
        "meta_on": ap(recipe("metaeol-tp", exit_layer=EXIT)),
        "meta_off": ap(recipe("metaeol-tp", exit_layer=EXIT), prefix_cache=False),
    }
    v["tp_hooks"].backend = HookBackend(model)
    v["peol_hf"].backend = FullForwardBackend(model)
    return v


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled process RSS above the starting RSS on CPU (MB).

    The CPU figure is only meaningful when freed tensors go back to the OS: the timing run therefore takes it from a
    separate one-round ``--memory-only`` child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then
    maps every large tensor on its own and unmaps it when freed), which leaves the timed process's allocator alone.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.top = self.base
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.002):
            self.top = max(self.top, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.top = max(self.top, self.proc.memory_info().rss)
            self.peak = (self.top - self.base) / 2**20
        return False


def measure(emb, texts, batch_size, device) -> tuple[float, float]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        emb.encode(texts, batch_size=batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return dt / len(texts), mem.peak


def bench(label, model, tok, device, batch_size, n, n_heavy, rounds, log) -> dict:
    texts_all = sentences(max(n, n_heavy))
    vs = variants(model, tok)
    texts = {k: texts_all[: (n_heavy if k in HEAVY else n)] for k in vs}
    for k, e in vs.items():  # warm-up: nnsight code compiled, prompt prefixes computed
        e.encode(texts[k][:2], batch_size=batch_size)
        e.stats = type(e.stats)()
    times: dict[str, list[float]] = {k: [] for k in vs}
    mems: dict[str, list[float]] = {k: [] for k in vs}
    names = list(vs)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t, m = measure(vs[k], texts[k], batch_size, device)
            times[k].append(t)
            mems[k].append(m)
        log(f"  [{label} b={batch_size}] round {r + 1}/{rounds} done")
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    peol_rows = [len(row.ids) for row in vs["peol"].tokenize(texts["peol"], vs["peol"].recipe.templates[0])]
    n_prompt = sum(peol_rows) / len(peol_rows)
    calls = {k: -(-len(texts[k]) // batch_size) * len(vs[k].recipe.templates) for k in vs}
    overhead_ms = statistics.median(
        (x - y) * len(texts["tp_nopfx"]) / calls["tp_nopfx"] * 1e3 for x, y in zip(times["tp_nopfx"], times["tp_hooks"]))
    rows = {
        "TP / PromptEOL (prefix reuse on, default)": (ratio("tp", "peol"), (n_prompt + 1) / n_prompt + 0.02),
        "TP / PromptEOL (prefix reuse off)": (ratio("tp_nopfx", "peol_nopfx"), (n_prompt + 1) / n_prompt + 0.02),
        "nnsight engine / plain hooks (TP, same batches, no prefix reuse)": (ratio("tp_nopfx", "tp_hooks"), 1.05),
        "nnsight engine (default, prefix reuse) / plain hooks": (ratio("tp", "tp_hooks"), None),
        "exit hidden_states[20] / full forward (hidden_states[30], no LM head)": (ratio("peol_x20", "peol_full"), 0.72),
        "exit hidden_states[20] / naive HF forward (output_hidden_states, LM head)": (ratio("peol_x20", "peol_hf"), None),
        "Knowledge Enhancement+TP: prefix reuse off / on (speed-up)": (ratio("ke_off", "ke_on"), "1.5 (min)"),
        "MetaEOL+TP: prefix reuse off / on (speed-up)": (ratio("meta_off", "meta_on"), None),
        "MetaEOL+TP / PromptEOL+TP (prefix reuse on)": (ratio("meta_on", "tp"), None),
        "MetaEOL+TP / PromptEOL+TP (prefix reuse off)": (ratio("meta_off", "tp_nopfx"), None),
        "echo / PromptEOL": (ratio("echo", "peol"), None),
    }
    return {
        "model": label, "batch_size": batch_size, "rounds": rounds, "sentences": n, "sentences_long_prompts": n_heavy,
        "mean_prompteol_tokens": round(n_prompt, 2),
        "engine_fixed_overhead_ms_per_call": round(overhead_ms, 3),
        "ratios": {k: {"median": round(v, 4), "target": t} for k, (v, t) in rows.items()},
        "variants": {k: {"sentences_per_s": round(1.0 / med[k], 2), "ms_per_sentence": round(med[k] * 1e3, 3),
                         "peak_mem_mb": round(max(mems[k]), 1), "padding_waste": round(vs[k].stats.padding_waste, 4),
                         "prefix_tokens_saved_per_sentence": round(vs[k].stats.prefix_tokens_saved
                                                                   / max(vs[k].stats.rows, 1), 1)}
                     for k in vs},
    }


def show(res: dict) -> str:
    lines = [f"\n== {res['model']}  batch {res['batch_size']}  ({res['sentences']} sentences, "
             f"{res['sentences_long_prompts']} for KE/MetaEOL; {res['rounds']} rounds; PromptEOL prompt n = "
             f"{res['mean_prompteol_tokens']} tokens)"]
    lines.append(f"{'ratio (median of per-round ratios)':<76} {'value':>7}  target")
    for k, r in res["ratios"].items():
        t = r["target"]
        verdict = ""
        if isinstance(t, (int, float)):
            verdict = f"<= {t:.3f}  {'OK' if r['median'] <= t else 'MISSED'}"
        elif isinstance(t, str):
            verdict = f">= {t.split()[0]}  {'OK' if r['median'] >= float(t.split()[0]) else 'MISSED'}"
        lines.append(f"{k:<76} {r['median']:>7.3f}  {verdict}")
    lines.append(f"{'engine fixed overhead per call vs hooks (ms)':<76} {res['engine_fixed_overhead_ms_per_call']:>7.3f}"
                 + ("  < 2 ms  " + ("OK" if res["engine_fixed_overhead_ms_per_call"] < 2 else "MISSED")
                    if res["batch_size"] == 1 else ""))
    lines.append(f"{'variant':<12} {'sent/s':>9} {'ms/sent':>9} {'peak MB':>8} {'pad waste':>9} {'prefix tok saved/sent':>22}")
    for k, v in res["variants"].items():
        lines.append(f"{k:<12} {v['sentences_per_s']:>9.2f} {v['ms_per_sentence']:>9.2f} {v['peak_mem_mb']:>8.1f} "
                     f"{v['padding_waste']:>9.3f} {v['prefix_tokens_saved_per_sentence']:>22.1f}")
    return "\n".join(lines)


def cpu_peak_memory(argv, results, log):
    """Re-run every variant once in a child process whose freed tensors return to the OS; take its peak RSS."""
    import subprocess

    log("  memory pass (child process, one round)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *[a for a in argv if a != "--memory-only"], "--memory-only"]
    if "--out" in cmd:
        i = cmd.index("--out")
        del cmd[i: i + 2]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    for res, peaks in zip(results, json.loads(out)):
        for k, v in res["variants"].items():
            v["peak_mem_mb"] = peaks[k]
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model name/path for tpsurgery.load_model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny random 30-layer Llama")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--n", type=int, default=96, help="sentences per variant at batch > 1")
    ap.add_argument("--n-long", type=int, default=32, help="sentences for Knowledge Enhancement / MetaEOL at batch > 1")
    ap.add_argument("--n1", type=int, default=16, help="sentences per variant at batch 1")
    ap.add_argument("--n1-long", type=int, default=8, help="KE / MetaEOL sentences at batch 1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    models = []
    if not args.no_tiny:
        from tpsurgery.testing import tiny_model

        m, tok = tiny_model("llama", n_layers=30, hidden=64, dtype=dtype)
        models.append(("tiny-llama-30L-h64", m.to(args.device), tok))
    m, tok = tpsurgery.load_model(args.model, dtype=dtype, device=args.device)
    models.append((Path(args.model).name, m, tok))

    results = []
    t0 = time.time()
    for label, model, tok in models:
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            n, n_long = (args.n1, args.n1_long) if bs == 1 else (args.n, args.n_long)
            res = bench(label, model, tok, args.device, bs, n, n_long, 1 if args.memory_only else args.rounds, log)
            results.append(res)
    if args.memory_only:
        print(json.dumps([{k: v["peak_mem_mb"] for k, v in r["variants"].items()} for r in results]))
        return 0
    if not args.device.startswith("cuda"):
        results = cpu_peak_memory(argv if argv is not None else sys.argv[1:], results, log)
    for res in results:
        print(show(res), flush=True)
    report(" ".join([os.path.basename(sys.executable), *sys.argv]), args, t0, results,
           load_avg_at_end=os.getloadavg())
    return 0


def report(command: str, args: Any, t0: float, results: list, **extra: Any) -> None:
    """Print the machine line and write ``{"env", "results"}`` to ``args.out`` (shared by the benchmarks)."""
    env = {"command": command, "device": args.device, "dtype": args.dtype, "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), **extra,
           "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    print(f"\nmachine: {json.dumps(env)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
