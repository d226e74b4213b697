"""``torchrun -m tpsurgery embed`` (issue 16): two CPU processes on gloo write the array one process writes.

Real processes (torchrun, as a user runs it), a tiny random model saved to a folder and loaded by path, separate
embedding caches so that nothing is shared between the runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tpsurgery.testing import tiny_model

RECIPE = "prompt: 'This sentence : <PST> \"{text}\" means'\ntp: {start: 1, stop: 3}\nexit_layer: 3\n"
LINES = ["a b", "c d e", "hello world", "x", "a b", "the end of it", "q", "", "more text here"]


def _embed(tmp: Path, launcher: list[str], output: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TPSURGERY_EMBEDDING_CACHE": str(tmp / cache),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [*launcher, "-m", "tpsurgery", "embed", "--model", str(tmp / "tiny"), "--recipe", str(tmp / "r.yaml"),
           "--input", str(tmp / "in.txt"), "--output", str(tmp / output), "--no-progress", "--batch-size", "2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_processes_write_the_single_process_array(tmp_path):
    model, tok = tiny_model("llama", n_layers=4)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n")
    one = _embed(tmp_path, [sys.executable], "a.npy", "cache-a")
    assert one.returncode == 0, one.stderr
    two = _embed(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
                 "b.npy", "cache-b")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 reports
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == b.shape == (len(LINES), 32) and np.allclose(a, b, atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # parts merged and removed


def test_killed_torchrun_run_restarts_and_finishes_with_the_same_file(tmp_path):
    """Every process of a torchrun run is killed once rank 0's part is written (rank 1's shard holds the long lines,
    so it is still working); the same command then finishes with the one-process array."""
    import signal
    import time

    model, tok = tiny_model("llama", n_layers=4)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "r.yaml").write_text(RECIPE)
    lines = [f"w{i}" for i in range(200)] + [f"lorem ipsum dolor {i} " * 12 for i in range(200)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TPSURGERY_EMBEDDING_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [*launcher, "-m", "tpsurgery", "embed", "--model", str(tmp_path / "tiny"), "--recipe", str(tmp_path / "r.yaml"),
           "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "b.npy"), "--no-progress"]
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / ".b.npy.parts"
    deadline = time.time() + 300
    while not list(parts.glob("rank00000-*.npy")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(run.pid)], capture_output=True, text=True).stdout.split()
    for pid in [run.pid, *map(int, workers)]:  # torchrun's workers run in sessions of their own: kill each
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run.wait()
    killed_midway = not (tmp_path / "b.npy").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    one = _embed(tmp_path, [sys.executable], "a.npy", "cache-a")
    assert one.returncode == 0, one.stderr
    assert np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6, rtol=0)
    assert not parts.exists() and killed_midway
