"""Reliability 2 (issue 13): odd line breaks, long lines, unwritable outputs, resume, corrupt and read-only caches.

Real tiny models saved to disk, the real CLI, real files, real resource limits; failures injected with torch hooks.
See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.batching import token_batches
from tpsurgery.cli import app
from tpsurgery.testing import tiny_model

REC = {"prompt": 'This sentence : <PST> "{text}" means in one word:"', "tp": {"start": 0, "stop": 2}, "exit_layer": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved to disk, a recipe file, and the in-memory model/tokenizer the CLI will load."""
    folder = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model("llama")
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "r.yaml").write_text(json.dumps(REC), encoding="utf-8")
    return folder, model, tok


def _args(saved, inp, out, *more):
    folder = saved[0]
    return ["embed", "-i", str(inp), "-o", str(out), "-r", str(folder / "r.yaml"), "-m", str(folder / "model"),
            "--no-progress", *more]


class _Forwards:
    """Counts decoder-layer forwards in any model (a global hook: the CLI loads its own copy); raises
    KeyboardInterrupt at forward ``stop_at`` if given."""

    def __init__(self, stop_at: int | None = None):
        self.n, self.stop_at = 0, stop_at

    def __call__(self, module, args):
        if type(module).__name__ == "LlamaDecoderLayer" and module.self_attn.layer_idx == 0:
            self.n += 1
            if self.n == self.stop_at:
                raise KeyboardInterrupt

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------- 1. lines
def test_one_row_per_newline_separated_line(saved, tmp_path):
    """Only '\\n' ends a line (str.splitlines also broke at U+2028, U+0085, \\f, \\x1c-\\x1e and a lone \\r: 7 lines
    gave 12 rows); a CRLF's '\\r' and a leading BOM are not text."""
    lines = ["a b", "c\u2028d", "e\x85f", "g\x0ch", "i\x1cj\x1dk\x1el", "m\rn", "last"]
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:3]).encode() + b"\r\n" + "\n".join(lines[3:]).encode())
    result = CliRunner().invoke(app, _args(saved, inp, tmp_path / "o.npy"))
    assert result.exit_code == 0, result.output
    got = np.load(tmp_path / "o.npy")
    emb = tpsurgery.apply(saved[1], REC, tokenizer=saved[2])
    assert got.shape == (7, 32)
    np.testing.assert_allclose(got, emb.encode(lines), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- 2. long lines
def test_a_long_line_runs_alone_and_the_bar_moves_by_texts():
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok, prefix_cache=False)
    texts = ["word " * 300] + [f"short {i}" for i in range(31)]
    lengths = [len(r.ids) for r in emb.tokenize(texts, emb.recipe.templates[0])]
    updates: list[float] = []

    class Bar:
        def update(self, n):
            updates.append(n)

    emb.encode(texts, batch_size=32, show_progress_bar=Bar())
    assert emb.stats.batches == 2  # was one batch of 32 rows, all padded to the long one
    budget = tpsurgery.batching.default_budget(lengths, 32)  # the long row takes only what fits in the budget
    assert emb.stats.padded_tokens <= budget + 31 * max(lengths[1:]) < 32 * lengths[0] / 3, (emb.stats, lengths)
    assert sum(updates) == 32 and len(updates) == 2 and updates[0] < 8  # per batch, counted in texts


@given(st.lists(st.integers(1, 60), max_size=40), st.integers(1, 8), st.one_of(st.none(), st.integers(1, 200)),
       st.booleans())
def test_token_batches_partition_the_rows_within_the_budget(lengths, batch_size, max_tokens, exact):
    groups = token_batches(lengths, batch_size, max_tokens, exact)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    budget = max_tokens or tpsurgery.batching.default_budget(lengths, batch_size)
    for g in groups:
        width = max(lengths[i] for i in g)
        assert len(g) <= batch_size and (len(g) == 1 or len(g) * width <= budget)
        assert not exact or len({lengths[i] for i in g}) == 1


# ---------------------------------------------------------------------------------------------- 3. outputs
def test_unwritable_outputs_fail_before_any_work(saved, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = {tmp_path / "folder": "is a folder", tmp_path / "afile" / "o.npy": "cannot write --output"}
    if not os.access("/sys", os.W_OK) or not _can_create("/sys"):  # read-only even for root
        cases[Path("/sys/o.npy")] = "cannot write --output /sys/o.npy"
    for out, message in cases.items():
        with _Forwards() as seen:
            result = CliRunner().invoke(app, _args(saved, inp, out))
        assert isinstance(result.exception, tpsurgery.InputError) and message in str(result.exception), out
        assert seen.n == 0, out
    done = subprocess.run([sys.executable, "-m", "tpsurgery.cli", *_args(saved, inp, tmp_path / "folder")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: --output") and "Traceback" not in done.stderr


def _can_create(folder: str) -> bool:
    try:
        Path(folder, ".tpsurgery-probe").touch()
    except OSError:
        return False
    Path(folder, ".tpsurgery-probe").unlink()
    return True


def test_a_full_disk_fails_before_any_work(saved, tmp_path):
    """No room for the array (a real file-size limit: the kernel refuses the space) -> one error, no forward run."""
    resource = pytest.importorskip("resource")
    import signal

    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(f"line {i}" for i in range(2000)), encoding="utf-8")  # 2000 x 32 float32 = 256 KB
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
    try:
        with _Forwards() as seen:
            result = CliRunner().invoke(app, _args(saved, inp, tmp_path / "o.npy", "--no-resume"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert isinstance(result.exception, tpsurgery.InputError), result.output
    assert str(result.exception).startswith(f"cannot write --output {tmp_path / 'o.npy'}") and seen.n == 0
    assert os.listdir(tmp_path) == ["in.txt"]


# ----------------------------------------------------------------------------------------------- 4. resume
def test_cli_embed_resumes_after_an_interruption(saved, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(f"sentence number {i} " + "x " * (i % 5) for i in range(40)), encoding="utf-8")
    with _Forwards() as full:
        assert CliRunner().invoke(app, _args(saved, inp, tmp_path / "want.npy", "--no-resume",
                                             "--batch-size", "4")).exit_code == 0
    with _Forwards(stop_at=4) as cut:  # the prompt prefix, then the third batch: two have finished
        result = CliRunner().invoke(app, _args(saved, inp, tmp_path / "o.npy", "--batch-size", "4"))
    assert result.exit_code != 0 and cut.n == 4 and not (tmp_path / "o.npy").exists()
    with _Forwards() as rerun:
        assert CliRunner().invoke(app, _args(saved, inp, tmp_path / "o.npy", "--batch-size", "4")).exit_code == 0
    assert rerun.n == full.n - 2
    assert np.array_equal(np.load(tmp_path / "o.npy"), np.load(tmp_path / "want.npy"))
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "o.npy", "want.npy"]
