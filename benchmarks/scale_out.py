"""Scale-out benchmark: ``tpsurgery embed`` in one process vs ``torchrun --nproc-per-node=2`` on the CPU.

    python benchmarks/scale_out.py                       # SmolLM2-135M, 400 STS-B dev sentences, 1 thread per process
    python benchmarks/scale_out.py --lines 800 --rounds 5

Each round runs, in turn: one process with 1 thread, one process with 2 threads, and two processes (torchrun) with
1 thread each, as whole commands (start-up and model load included, as a user sees them; the embedding cache off).
Prints the median over interleaved rounds of the per-round time ratios, and checks that the arrays agree (float32
rounding). On a shared machine the load changes from round to round: read the ratios, not the seconds; the 1-minute
load average before each round is printed. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sentences(n: int) -> list[str]:
    """The first ``n`` distinct sentences of the STS-B dev set (SentEval layout in ../shared/data)."""
    path = ROOT.parent / "shared/data/senteval/STS/STSBenchmark/sts-dev.csv"
    out: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            for s in row[5:7]:
                out.setdefault(s.strip())
            if len(out) >= n:
                break
    return list(out)[:n]


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="smollm2-prompteol-tp", help="shipped name or YAML file")
    ap.add_argument("--lines", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="tpsurgery-scale-"))
    texts = folder / "texts.txt"
    texts.write_text("\n".join(sentences(args.lines)) + "\n", encoding="utf-8")
    common = ["-m", "tpsurgery", "embed", "--model", args.model, "--recipe", args.recipe, "--input", str(texts),
              "--no-progress", "--no-resume"]
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    setups = {"1 process, 1 thread": (py, 1), "1 process, 2 threads": (py, 2), "2 processes, 1 thread each": (torchrun, 1)}
    times: dict[str, list[float]] = {k: [] for k in setups}
    for r in range(args.rounds):
        print(f"round {r + 1}: load {os.getloadavg()[0]:.1f}", flush=True)
        for name, (launcher, threads) in setups.items():
            times[name].append(run(launcher + common + ["--output", str(folder / f"{len(times[name])}-{name[0]}{threads}.npy")],
                                   threads))
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    base = times["1 process, 1 thread"]
    for name, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts))
        print(f"{name:28s} median {statistics.median(ts):6.1f} s   speed-up vs 1 process 1 thread: {ratio:.2f}x")
    arrays = [np.load(p) for p in sorted(folder.glob("0-*.npy"))]
    diff = max(float(np.abs(a - arrays[0]).max()) for a in arrays)
    print(f"{len(arrays)} outputs of round 1, {arrays[0].shape}: max abs difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
