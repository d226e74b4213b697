"""``torchrun -m tpsurgery embed`` / ``eval`` (issue 16): two CPU processes on gloo give what one process gives.

Real processes (torchrun, as a user runs it), a tiny random model saved to a folder and loaded by path, caches in the
test's own folder (``TPSURGERY_CACHE``, ``TPSURGERY_EMBEDDING_CACHE``) so that nothing is shared between runs.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tpsurgery.testing import tiny_model

RECIPE = "prompt: 'This sentence : <PST> \"{text}\" means'\ntp: {start: 1, stop: 3}\nexit_layer: 3\n"
LINES = ["a b", "c d e", "hello world", "x", "a b", "the end of it", "q", "", "more text here"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"


def _setup(tmp: Path, lines: list[str]) -> None:
    model, tok = tiny_model("llama", n_layers=4)
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    (tmp / "r.yaml").write_text(RECIPE)
    (tmp / "in.txt").write_text("\n".join(lines) + "\n")


def _env(tmp: Path, cache: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TPSURGERY_CACHE": str(tmp / "tpsurgery-cache"),
            "TPSURGERY_EMBEDDING_CACHE": str(tmp / cache),
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def _embed_cmd(tmp: Path, launcher: list[str], output: str, *extra: str) -> list[str]:
    return [*launcher, "-m", "tpsurgery", "embed", "--model", str(tmp / "tiny"), "--recipe", str(tmp / "r.yaml"),
            "--input", str(tmp / "in.txt"), "--output", str(tmp / output), "--no-progress", *extra]


def _embed(tmp: Path, launcher: list[str], output: str, cache: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_embed_cmd(tmp, launcher, output, *extra), env=_env(tmp, cache), capture_output=True,
                          text=True, timeout=600)


def test_torchrun_two_processes_write_the_single_process_array(tmp_path):
    _setup(tmp_path, LINES)
    one = _embed(tmp_path, [sys.executable], "a.npy", "cache-a", "--batch-size", "2")
    assert one.returncode == 0, one.stderr
    two = _embed(tmp_path, TORCHRUN, "b.npy", "cache-b", "--batch-size", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 reports
    # nothing was cached before; "a b" is in both shards, so one rank may find the other's row in the shared cache
    assert sum(int(n) for n in re.findall(r"resumed: (\d+) text", two.stderr)) <= 1, two.stderr
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == b.shape == (len(LINES), 32) and np.allclose(a, b, atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # parts merged and removed


@pytest.mark.skipif(not (SAMPLES / "STS").is_dir(), reason="needs ../shared/data/format-samples")
def test_torchrun_eval_scores_like_one_process(tmp_path):
    """``eval sts`` under torchrun: each rank embeds a share of every encode call, rows are gathered in order, rank 0
    alone prints and writes the results, which are the one-process scores."""
    from typer.testing import CliRunner

    from tpsurgery.cli import app
    from tpsurgery.evaluation import read_results

    _setup(tmp_path, LINES)
    args = ["eval", "sts", "-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "tiny"), "-d", str(SAMPLES),
            "--tasks", "sts13,sickr", "--no-progress", "--no-resume"]
    one = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    two = subprocess.run([*TORCHRUN, "-m", "tpsurgery", *args, "-o", str(tmp_path / "two.json")],
                         env=_env(tmp_path, "cache"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("| Method |") == 1 and two.stderr.count("wrote") == 1  # rank 0 reports
    [a], [b] = (read_results(tmp_path / f"{n}.json") for n in ("one", "two"))
    assert set(a["scores"]) == {"sts13", "sickr"} and a["scores"] == pytest.approx(b["scores"], abs=2e-4)


def _cache_rows(folder: Path, mode: str = "ro") -> int:
    try:  # after a SIGKILL mid-write only a read-write connection rolls the hot journal back (read-only sees nothing)
        con = sqlite3.connect(f"file:{folder / 'embeddings.sqlite'}?mode={mode}", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM emb2").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_killed_torchrun_run_restarts_and_finishes_with_the_same_file(tmp_path):
    """Every process of a torchrun run is SIGKILLed once rank 0's part is written and rank 1 (200 distinct long lines;
    rank 0's shard is one line repeated) has stored some batches in the embedding cache. The same command then reuses
    rank 0's part, takes exactly the rows rank 1 had stored from the cache, and writes the one-process array."""
    lines = ["w"] * 200 + [f"lorem ipsum dolor {i} " * 12 for i in range(200)]
    _setup(tmp_path, lines)
    cmd, env = _embed_cmd(tmp_path, TORCHRUN, "b.npy", "--batch-size", "4"), _env(tmp_path, "cache")
    parts = tmp_path / ".b.npy.parts"
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (list(parts.glob("rank00000-*.npy")) and _cache_rows(tmp_path / "cache") >= 1 + 8):
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        workers = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(run.pid)], capture_output=True,
                                                  text=True).stdout.split()]
    finally:
        run.kill()  # torchrun's workers run in sessions of their own: each is killed by its id
        run.wait()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert len(workers) == 2
    deadline = time.monotonic() + 60
    while not all(map(_gone, workers)):
        assert time.monotonic() < deadline, "a worker survived SIGKILL"
        time.sleep(0.05)
    assert not (tmp_path / "b.npy").exists() and not list(parts.glob("rank00001-*.npy"))  # killed midway
    from_rank1 = _cache_rows(tmp_path / "cache", mode="rw") - 1  # rank 0's shard is one distinct text
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "rank 0/2: resumed: this rank's shard was finished by an earlier run" in again.stderr, again.stderr
    assert re.findall(r"rank 1/2: resumed: (\d+) text\(s\) came from the embedding cache", again.stderr) == \
        [str(from_rank1)] and 8 <= from_rank1 < 200, again.stderr
    one = _embed(tmp_path, [sys.executable], "a.npy", "cache-a", "--batch-size", "4")
    assert one.returncode == 0, one.stderr
    assert np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6, rtol=0)
    assert not parts.exists()
