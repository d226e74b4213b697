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
from tpsurgery.foreign import observer

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
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(observer(self))
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


# ------------------------------------------------------------------------------------------ 5. damaged caches
def test_damaged_converted_weights_are_converted_again(smollm2, tmp_path, monkeypatch):
    """Two changed bytes in the converted SmolLM2 weights (they shifted embeddings by 3.2, silently) are caught by the
    checksum recorded at conversion and the GGUF file is converted again, with a warning naming the file."""
    import shutil

    from tpsurgery import models

    gguf = models.smollm2_gguf_path()  # found before the cache moves (`tpsurgery fetch-model` keeps it in the cache)
    shared = models._converted_copy(gguf)  # the session's copy (converted once)
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path))
    target = tmp_path / "models" / shared.name
    shutil.copytree(shared, target)
    assert models.verify_converted(target) is None
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        b = f.read(2)
        f.seek(-2, 1)
        f.write(bytes(x ^ 0x40 for x in b))
    assert "model.safetensors does not match" in models.verify_converted(target)
    with pytest.warns(UserWarning, match=r"converted model .* is damaged \(.*model.safetensors does not match"):
        assert models._converted_copy(gguf) == target
    assert models.verify_converted(target) is None
    left = [p.name for p in (tmp_path / "models").iterdir() if p.name != ".gguf-digests.json"]  # (the digest memo)
    assert left == [shared.name]  # nothing left aside


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:  # garbled: bytes inside a stored embedding change (SQLite itself notices nothing)
        blob = np.float32(0.25).tobytes()  # the first stored value
        k = data.index(blob)
        path.write_bytes(data[:k] + np.float32(7.0).tobytes() + data[k + 4:])


@pytest.mark.parametrize("how", ["truncated", "garbage", "garbled"])
def test_a_damaged_embedding_cache_is_moved_aside_and_never_trusted(tmp_path, how):
    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=tmp_path)
    texts = [f"text {i} " + "y " * i for i in range(60)]
    want = emb.encode(texts)
    key = emb._cached(texts, emb.plan, False)[1]
    emb.embedding_cache.put(key, {texts[0]: np.full(32, 0.25, np.float32)})  # a value easy to find in the file
    if how != "garbled":
        emb.embedding_cache.put(key, {texts[0]: want[0]})
    _damage(tmp_path / "embeddings.sqlite", how)
    with pytest.warns(UserWarning, match=r"embedding cache .* is unreadable or corrupt .* moved it to"):
        got = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=tmp_path).encode(texts)
    np.testing.assert_array_equal(got, want)
    assert len(list(tmp_path.glob("embeddings.sqlite.corrupt-*"))) == 1


def test_all_nan_output_is_an_error_in_the_cli(saved, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("one\ntwo\n", encoding="utf-8")

    def nan(module, args, output):
        if type(module).__name__ == "LlamaDecoderLayer":
            return (output[0] * float("nan"), *output[1:]) if isinstance(output, tuple) else output * float("nan")

    handle = torch.nn.modules.module.register_module_forward_hook(nan)
    try:
        result = CliRunner().invoke(app, _args(saved, inp, tmp_path / "o.npy", "--no-resume"))
    finally:
        handle.remove()
    assert isinstance(result.exception, tpsurgery.TpsurgeryError), result.output
    assert "all 2 lines are NaN, inf or all zero" in str(result.exception) and os.listdir(tmp_path) == ["in.txt"]


# ---------------------------------------------------------------------------------------- 6. read-only cache
def test_an_unusable_embedding_cache_is_one_warning_and_the_work_goes_on(tmp_path):
    (tmp_path / "afile").write_text("x")
    model, tok = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"embedding cache .* cannot be used .* going on without storing") as caught:
        emb = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=tmp_path / "afile" / "cache")
        got = emb.encode(["a", "b"])
        emb.encode(["c"])
    assert len([w for w in caught if "embedding cache" in str(w.message)]) == 1
    np.testing.assert_array_equal(got, tpsurgery.apply(model, REC, tokenizer=tok).encode(["a", "b"]))


READ_ONLY = """
import os, sys, warnings, numpy as np, tpsurgery
from tpsurgery.testing import tiny_model
rec = {"prompt": '<PST> {text} means', "exit_layer": 2}
model, tok = tiny_model("llama")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    emb = tpsurgery.apply(model, rec, tokenizer=tok, embedding_cache=sys.argv[1])
    out = emb.encode(["a", "b", "c"], batch_size=1)
print(out.shape, emb.embedding_cache.hits, [str(w.message)[:60] for w in caught if "cache" in str(w.message)])
"""


def test_a_read_only_cache_warns_once_and_still_returns_embeddings(tmp_path):
    """A real read-only cache: a read-only bind mount (root writes through permissions) or, for other users, a folder
    and file without write permission. The API used to compute, then raise a raw sqlite3.OperationalError."""
    import shutil

    cache = tmp_path / "cache"
    model, tok = tiny_model("llama")
    tpsurgery.apply(model, {"prompt": '<PST> {text} means', "exit_layer": 2}, tokenizer=tok,
                    embedding_cache=cache).encode(["a"])  # one entry stored while writable
    cmd = [sys.executable, "-c", READ_ONLY, str(cache)]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare: no way to make a folder read-only")
        import shlex

        cmd = ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {shlex.quote(str(cache))} {shlex.quote(str(cache))} "
               f"&& exec {shlex.join(cmd)}"]
    else:
        os.chmod(cache / "embeddings.sqlite", 0o444)
        os.chmod(cache, 0o555)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(cache, 0o755)
    if os.geteuid() == 0 and done.returncode and "mount" in done.stderr and "Traceback" not in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("(3, 32) 1 ['the embedding cache"), done.stdout  # the stored entry still read
    assert done.stdout.count("the embedding cache") == 1, done.stdout


# ------------------------------------------------------------------------------------------------- 7. odds
def test_an_empty_recipe_file_is_an_error_not_the_default_recipe(tmp_path):
    for text in ("", "  \n\n", "# only a comment\n"):
        (tmp_path / "r.yaml").write_text(text, encoding="utf-8")
        with pytest.raises(tpsurgery.RecipeError, match=r"r.yaml is empty"):
            tpsurgery.load_recipe(tmp_path / "r.yaml")


def test_ctrl_c_in_the_cli_is_one_line_and_exit_130(saved, tmp_path, monkeypatch, capfd):
    from tpsurgery.cli import main

    inp = tmp_path / "in.txt"
    inp.write_text("one\ntwo\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["tpsurgery", *_args(saved, inp, tmp_path / "o.npy")])
    with _Forwards(stop_at=1), pytest.raises(SystemExit) as info:
        main()
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 130 and len(err) == 1 and err[0].startswith("interrupted"), err


def test_umask_quiet_bars_and_no_orphans_after_kill_9(saved, tmp_path):
    """The output's mode follows the umask (was always 0600); --no-progress silences every bar (model loading
    included); a run killed with SIGKILL while writing leaves a temporary file that the next run removes."""
    import signal
    import time

    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(f"line {i} " + "z " * (i % 7) for i in range(3000)), encoding="utf-8")
    out = tmp_path / "out" / "o.npy"
    cmd = [sys.executable, "-m", "tpsurgery.cli", *_args(saved, inp, out, "--no-resume")]
    killed = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out.parent.is_dir() and any(p.name.endswith(".tmp") for p in out.parent.iterdir())):
            assert time.monotonic() < deadline and killed.poll() is None, "no temporary output appeared"
            time.sleep(0.05)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    orphans = [p.name for p in out.parent.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(f".o.npy.{killed.pid}.")
    inp.write_text("one\ntwo\n", encoding="utf-8")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == "" and os.listdir(out.parent) == ["o.npy"]  # no bar at all; the orphan is gone
    assert (out.stat().st_mode & 0o777) == 0o640


# ---------------------------------------------------------------------------------------------- 8. versions
def test_prefix_reuse_passes_only_arguments_the_model_forward_takes():
    """transformers renamed `past_key_values` to `cache` (5.17 -> 5.24) and forwards swallow unknown keywords: on
    5.17 the prompt prefix was silently dropped (embeddings off by up to 59 %). Every keyword must be a real one."""
    import inspect

    from tpsurgery.prefix import compute_prefix
    from tpsurgery.batch import Batch

    model, tok = tiny_model("llama")
    emb = tpsurgery.apply(model, REC, tokenizer=tok)
    rows = emb.tokenize(["a b", "c"], emb.recipe.templates[0])
    prefix = compute_prefix(model, rows[0].ids[:5])
    batch = next(emb.batches(rows, 2))[1]
    assert isinstance(batch, Batch) and prefix is not None
    accepted = inspect.signature(type(model).forward).parameters
    assert set(prefix.model_inputs(batch, "cpu")) <= set(accepted)


def test_apply_refuses_versions_outside_the_verified_range(monkeypatch):
    from tpsurgery import versions

    with pytest.raises(tpsurgery.ModelError, match=r"^transformers 5\.16\.0 is installed, but tpsurgery is verified "
                                                   r"only with transformers>=5\.17\.0,<6"):
        versions.check_versions({"transformers": "5.16.0", "nnsight": "0.8.1"})
    versions.check_versions({"transformers": "5.17.0", "nnsight": "0.8.0"})  # the lowest verified: accepted
    monkeypatch.setitem(versions.VERIFIED, "nnsight", ("0.9.0", "1.0"))  # as if the installed one were too old
    model, tok = tiny_model("llama")
    with pytest.raises(tpsurgery.ModelError, match=r"nnsight .* is installed, but tpsurgery is verified only with "
                                                   r"nnsight>=0\.9\.0,<1\.0"):
        tpsurgery.apply(model, REC, tokenizer=tok)
