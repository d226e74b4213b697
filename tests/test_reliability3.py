"""Reliability 3 (issue 23): no number that looks right and isn't, no file destroyed, every usage error one line.

Each test here failed before its fix (see docs/reliability.md). Real tiny models, the real CLI, real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import random
import torch
import yaml
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.data import load_stsb
from tpsurgery.evaluation import evaluate_sts
from tpsurgery.testing import tiny_model
from tpsurgery.foreign import observer

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
USER_CACHE = os.environ.get("TPSURGERY_CACHE")  # before the autouse fixture moves it: the default model lives there
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")
PROMPT = "prompt: 'This sentence : <PST> \"{text}\" means in one word:\"'\n"
REC = {"prompt": 'This sentence : <PST> "{text}" means in one word:"', "tp": {"start": 0, "stop": 2}, "exit_layer": 3}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved to disk and a recipe file."""
    folder = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model("llama")
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "r.yaml").write_text(json.dumps(REC), encoding="utf-8")
    return folder, model, tok


def _embed_args(saved, inp, out, *more):
    folder = saved[0]
    return ["embed", "-i", str(inp), "-o", str(out), "-r", str(folder / "r.yaml"), "-m", str(folder / "model"),
            "--no-progress", *more]


def _cli(*args, stdin=None, env=None, timeout=300):
    """The installed entry point's behaviour (``tpsurgery.cli.main``) in a subprocess: exit code and stderr."""
    return subprocess.run([sys.executable, "-c", "from tpsurgery.cli import main; main()", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------- 1. best.yaml = the best cell
@pytest.mark.reliability(item=1, before='silent wrong', now='correct')
@needs_samples
@pytest.mark.parametrize("family,seed", [("qwen2", 5), ("llama", 3)])
def test_best_yaml_recreates_every_cell_and_the_best_exactly(family, seed, tmp_path):
    """best.yaml said `no TP (placeholder hidden)` but kept the visible placeholder (39.14 instead of 70.52)."""
    from tpsurgery.sweep import run_sweep, write_outputs

    model, tok = tiny_model(family, n_layers=3, seed=seed)
    pairs = load_stsb([SAMPLES], "test")
    res = run_sweep(model, PROMPT, pairs, stops=[2], starts=[1], tokenizer=tok, progress=False)
    base = 0  # best.yaml of the baseline row as the best cell must hide the placeholder
    cells = [list(row["scores"]) for row in res.rows]
    res.rows[base]["scores"] = [None] + [100.0] * (len(cells[base]) - 1)
    best = tpsurgery.load_recipe(write_outputs(res, tmp_path / "out")["best"])
    assert best.placeholder.mask == "all" and best.tp.empty and best.exit_layer == 1
    res.rows[base]["scores"] = cells[base]
    for r, row in enumerate(res.rows):  # every cell, the baseline row included
        for m, want in enumerate(row["scores"]):
            got = evaluate_sts(tpsurgery.apply(model, res.row_recipe(r, m), tokenizer=tok), [pairs])[pairs.name]
            if want is None:
                assert np.isnan(got)
            else:
                assert got == pytest.approx(want, abs=1e-6), (row["label"], m)


# --------------------------------------------------------------- 5. stored sweeps keyed by data; sample size shown
@pytest.mark.reliability(item=5, before='silent wrong', now='correct')
@needs_samples
def test_a_limited_sweep_never_replaces_the_full_data_sweep_that_auto_reads(tmp_path):
    from tpsurgery.sweep import run_sweep
    from tpsurgery.sweep_store import resolve_auto_exit

    model, tok = tiny_model("qwen2", n_layers=4, seed=5)
    pairs = load_stsb([SAMPLES], "test")
    few = load_stsb([SAMPLES], "test", limit=3)
    full = run_sweep(model, PROMPT, pairs, stops=[2, 3], tokenizer=tok, progress=False)
    full.store()
    recipe = tpsurgery.parse_recipe(PROMPT).replace(tp=full.rows[1]["tp"], exit_layer="auto")
    want = resolve_auto_exit(model, recipe)
    small = run_sweep(model, PROMPT, few, stops=[2, 3], tokenizer=tok, progress=False)
    small.rows[1]["scores"] = [None] * (len(small.rows[1]["scores"]) - 1) + [99.0]  # a different best exit
    p = small.store()
    assert p != full.store() and json.loads(p.read_text())["n_pairs"] == 3
    assert resolve_auto_exit(model, recipe) == want  # the full-data sweep still decides


@pytest.mark.reliability(item=5, before='silent wrong', now='correct')
@needs_samples
def test_heatmap_and_variant_outputs_say_how_many_pairs(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tpsurgery.sweep import run_sweep
    from tpsurgery.variants import parse_vary, run_variants

    titles = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (titles.extend(
        ax.get_title() for ax in self.axes), real(self, *a, **k))[1])
    model, tok = tiny_model("qwen2", n_layers=3, seed=5)
    pairs = load_stsb([SAMPLES], "test")
    res = run_sweep(model, PROMPT, pairs, stops=[2], tokenizer=tok, progress=False)
    res.heatmap(tmp_path / "h.png")
    found = run_variants(model, tpsurgery.parse_recipe(PROMPT), parse_vary(["placeholder.init=zeros,ones"]), pairs, stops=[2],
                         tokenizer=tok, progress=False)
    paths = found.write(tmp_path / "v")
    n = f"{len(pairs)} pairs"
    assert titles and all(n in t for t in titles if t), titles
    assert n in paths["table"].read_text()
    # --vary writes the best cell of all variants and a best.yaml that recreates it
    best = tpsurgery.load_recipe(paths["best"])
    top = max((s for res in found.sweeps for row in res.rows for s in row["scores"] if s is not None))
    got = evaluate_sts(tpsurgery.apply(model, best, tokenizer=tok), [pairs])[pairs.name]
    assert got == pytest.approx(top, abs=1e-6)


# -------------------------------------------------------------------------- 3. the input is read once, and whole
@pytest.mark.reliability(item=3, before='silent wrong', now='correct')
def test_stdin_from_a_pipe_gives_one_row_per_line(saved, tmp_path):
    """`--input /dev/stdin` from a pipe wrote 0 rows, exit 0 (the pipe was counted, then read again: empty)."""
    lines = [f"sentence number {i}" for i in range(7)]
    for name in ("-", "/dev/stdin"):
        out = tmp_path / f"o{len(name)}.npy"
        done = _cli(*_embed_args(saved, name, out, "--no-resume"), stdin="\n".join(lines) + "\n")
        assert done.returncode == 0, done.stderr[-3000:]
        emb = tpsurgery.apply(saved[1], REC, tokenizer=saved[2])
        np.testing.assert_allclose(np.load(out), emb.encode(lines), rtol=1e-5, atol=1e-6)
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the spooled copy is gone


class _Shrinking:
    """An embedder whose first ``encode`` call truncates (or extends) the input file, as another process might."""

    def __init__(self, emb, path: Path, keep: int | None):
        self.emb, self.path, self.keep, self.calls = emb, path, keep, 0

    def __getattr__(self, name):
        return getattr(self.emb, name)

    def encode(self, texts, **kw):
        if texts:
            self.calls += 1
            if self.calls == 1:
                data = self.path.read_bytes()
                self.path.write_bytes(data[: self.keep] if self.keep is not None else data + b"more\nlines\n")
        return self.emb.encode(texts, **kw)


@pytest.mark.reliability(item=3, before='silent wrong', now='clear error')
@pytest.mark.parametrize("keep", [40, None])
def test_an_input_that_changes_during_the_run_is_an_error_and_nothing_is_written(saved, tmp_path, keep):
    """A file that shrank mid-run gave its full row count with the missing rows all zero, exit 0."""
    from tpsurgery.embed_file import EmbedOptions, embed_file

    inp = tmp_path / "in.txt"
    inp.write_text("".join(f"line {i}\n" for i in range(40)), encoding="utf-8")
    emb = _Shrinking(tpsurgery.apply(saved[1], REC, tokenizer=saved[2]), inp, keep)
    with pytest.raises(tpsurgery.InputError, match="changed while it was read.*nothing was written"):
        embed_file(emb, inp, tmp_path / "o.npy", EmbedOptions(progress=False, chunk_lines=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


# ------------------------------------------------------------------- 4. all-zero embeddings are not silent either
@pytest.mark.reliability(item=4, before='silent wrong', now='clear error')
def test_a_huge_scale_that_zeroes_every_embedding_is_an_error_not_zeros(saved, tmp_path):
    """scale by 1e30 overflowed the final norm: every embedding exactly 0, exit 0."""
    rec = {**REC, "exit_layer": -1, "edits": [{"site": "layer_in", "layers": 3, "rows": "last", "op": "scale",
                                               "factor": 1e30}]}
    emb = tpsurgery.apply(saved[1], rec, tokenizer=saved[2])
    with pytest.warns(UserWarning, match=r"not finite or all zero"):
        out = emb.encode(["a b c", "d e"])
    assert not np.any(out)  # the case is real: the vectors are all zero
    (tmp_path / "r.yaml").write_text(json.dumps(rec), encoding="utf-8")
    (tmp_path / "in.txt").write_text("a b c\nd e\n", encoding="utf-8")
    done = _cli("embed", "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o.npy"), "-r", str(tmp_path / "r.yaml"),
                "-m", str(saved[0] / "model"), "--no-progress", "--no-resume")
    assert done.returncode == 2 and "NaN, inf or all zero" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "o.npy").exists()


# ----------------------------------------------------------------------- 6. no device or input file is destroyed
@pytest.mark.reliability(item=6, before='data lost', now='clear error')
def test_outputs_that_are_not_regular_files_or_the_input_are_refused_before_any_work(saved, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("one\ntwo\n", encoding="utf-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    from tpsurgery.textio import check_output

    for out, why in ((Path("/dev/null"), "character device"), (fifo, "FIFO"), (inp, "is the input file")):
        with pytest.raises(tpsurgery.InputError, match=why):  # checked alone first: code without the check must
            check_output(out, inp)                            # not get to replace the machine's /dev/null
        result = CliRunner().invoke(app, _embed_args(saved, inp, out))
        assert result.exit_code != 0 and why in str(result.exception), (out, result.output, result.exception)
    assert Path("/dev/null").is_char_device() and fifo.is_fifo() and inp.read_text() == "one\ntwo\n"
    link = tmp_path / "link.npy"  # a symlink output is replaced by the file; its target is left alone
    target = tmp_path / "target.npy"
    target.write_bytes(b"keep")
    link.symlink_to(target)
    assert CliRunner().invoke(app, _embed_args(saved, inp, link)).exit_code == 0
    assert not link.is_symlink() and np.load(link).shape == (2, 32) and target.read_bytes() == b"keep"
    for flag in ("--output", "--markdown"):  # eval's outputs too
        assert Path("/dev/null").is_char_device()
        result = CliRunner().invoke(app, ["eval", "sts", "-r", "prompteol", flag, "/dev/null", "-d", str(tmp_path)])
        assert "character device" in str(result.exception), result.output


# ---------------------------------------------------------------------- 10. no hang, no unbounded read
@pytest.mark.reliability(item=10, before='hang', now='clear error')
@pytest.mark.parametrize("what", ["recipe", "input"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_devices_and_fifos_as_recipe_or_input_are_refused_without_reading(saved, tmp_path, what, kind):
    import resource

    path = tmp_path / "fifo" if kind == "fifo" else Path(kind)
    if kind == "fifo":
        os.mkfifo(path)
    inp = tmp_path / "in.txt"
    inp.write_text("one\n", encoding="utf-8")
    args = ["-i", str(path if what == "input" else inp), "-o", str(tmp_path / "o.npy"),
            "-r", str(path if what == "recipe" else saved[0] / "r.yaml"), "-m", str(saved[0] / "model"), "--no-progress"]
    limit = 6 << 30  # /dev/zero read to the end would run into this, not into the machine's memory

    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-c", "from tpsurgery.cli import main; main()", "embed", *args],
                          capture_output=True, text=True, timeout=120, preexec_fn=bounded, stdin=subprocess.DEVNULL)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "not a regular file" in err[0], done.stderr[-2000:]
    if what == "recipe":
        with pytest.raises(tpsurgery.RecipeError, match="not a regular file"):
            tpsurgery.load_recipe(path)


# ------------------------------------------------------------- 8. usage errors: one line, exit 2, no traceback
@pytest.mark.reliability(item=8, before='raw traceback', now='clear error')
@pytest.mark.parametrize("args", [["--bogus"], ["embed", "-i", "x"], ["embed", "-i", "x", "-o", "y", "-r", "z",
                                                                         "--batch-size", "abc"],
                                  ["eval", "sts", "--nope"], ["recipe", "validate"]])
def test_usage_errors_are_one_error_line_and_exit_2(args):
    done = _cli(*args)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "--help" in err[0]


# ------------------------------------------------------------------- 2. GGUF conversions keyed by the content
def _fake_gguf_loader(calls):
    """transformers' GGUF loading stood in for by a tiny model derived from the file's bytes (no tiny GGUF writer
    exists); everything around it (keying, checksums, folders) is tpsurgery's real code."""
    import hashlib

    def load(path, dtype):
        calls.append(path)
        seed = int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:6], 16) % 10_000
        return tiny_model("llama", seed=seed)

    return load


@pytest.mark.reliability(item=2, before='silent wrong', now='correct')
def test_a_different_gguf_with_the_same_name_is_converted_on_its_own(tmp_path, monkeypatch):
    """A GGUF with 73 flipped bytes and the same file name reused the first one's converted weights."""
    import tpsurgery.models as M

    calls = []
    monkeypatch.setattr(M, "_load_gguf", _fake_gguf_loader(calls))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    first.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    second.write_bytes(b"GGUF" + bytes(255 - i for i in range(256)) * 4)
    weights = [M.load_model(p)[0].model.embed_tokens.weight.detach().clone() for p in (first, second, first)]
    assert len(calls) == 2  # the first file's conversion is reused, the second file converted on its own
    assert not torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    data = bytearray(first.read_bytes())
    data[100:173] = bytes(b ^ 0xFF for b in data[100:173])  # the same file, 73 bytes changed in place
    first.write_bytes(bytes(data))
    changed = M.load_model(first)[0].model.embed_tokens.weight
    assert len(calls) == 3 and not torch.equal(changed, weights[0])


# ------------------------------------------------- 7. every folder weights / embeddings are read from is checked
@pytest.mark.reliability(item=7, before='unsafe', now='clear error')
@pytest.mark.parametrize("where", ["cache", "models", "converted", "file", "embeddings-parent", "sweeps"])
def test_folders_others_may_write_to_are_refused_wherever_weights_or_embeddings_are_read(tmp_path, monkeypatch,
                                                                                        where):
    import tpsurgery.models as M
    from tpsurgery.cache import EmbeddingCache

    cache = tmp_path / "cache"
    monkeypatch.setenv("TPSURGERY_CACHE", str(cache))
    monkeypatch.delenv("TPSURGERY_EMBEDDING_CACHE", raising=False)
    monkeypatch.setattr(M, "_load_gguf", _fake_gguf_loader([]))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    M.load_model(gguf)  # converted once, private
    EmbeddingCache(cache / "sub" / "embeddings")
    converted = next(p for p in (cache / "models").iterdir() if p.is_dir())
    open_one = {"cache": cache, "models": cache / "models", "converted": converted,
                "file": converted / "model.safetensors", "embeddings-parent": cache / "sub",
                "sweeps": cache / "sweeps"}[where]
    open_one.mkdir(exist_ok=True) if where == "sweeps" else None
    os.chmod(open_one, 0o777 if open_one.is_dir() else 0o666)
    with pytest.raises(tpsurgery.ModelError, match="writable by every user"):
        if where in ("embeddings-parent",):
            EmbeddingCache(cache / "sub" / "embeddings")
        elif where == "sweeps":
            from tpsurgery.sweep_store import resolve_auto_exit

            model, tok = tiny_model("llama")
            resolve_auto_exit(model, tpsurgery.parse_recipe(PROMPT + "exit_layer: auto"))
        else:
            M.load_model(gguf)


# ----------------------------------------------------------------------------------- 9. no raw traceback
@pytest.mark.reliability(item=9, before='raw traceback', now='clear error')
def test_a_seed_beyond_64_bits_is_a_validation_error():
    """`recipe validate` said ok; encoding then failed with a raw RuntimeError from torch.manual_seed."""
    for rec in ({"prompt": "<PST> {text}", "placeholder": {"init": "gaussian", "seed": 2**64}},
                {"prompt": "<PST> {text}", "edits": [{"site": "layer_in", "layers": 1, "op": "write",
                                                      "value": "gaussian", "seed": -(2**63) - 1}]}):
        with pytest.raises(tpsurgery.RecipeError, match=r"seed.*must fit in 64 bits"):
            tpsurgery.parse_recipe(rec)
    model, tok = tiny_model("llama")
    edge = {"prompt": "<PST> {text}", "placeholder": {"init": "gaussian", "seed": 2**64 - 1}}
    assert np.isfinite(tpsurgery.apply(model, edge, tokenizer=tok).encode(["a b"])).all()  # the edge is usable


@pytest.mark.reliability(item=9, before='raw traceback', now='clear error')
def test_a_malicious_pickle_in_a_model_folder_is_one_model_error(tmp_path):
    """torch blocks the pickle (weights_only), but its UnpicklingError reached the user as a traceback."""
    import pickle

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=False)
    tok.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(tpsurgery.ModelError, match="cannot load model"):
        tpsurgery.load_model(tmp_path)
    assert not marker.exists()


@pytest.mark.reliability(item=9, before='raw traceback', now='clear error')
@pytest.mark.parametrize("version", ["not-a-version", "6.0.0.dev0", "6.0rc1"])
def test_versions_that_are_not_pep440_or_prereleases_of_the_excluded_one_are_refused(version, monkeypatch):
    from tpsurgery import versions

    with pytest.raises(tpsurgery.ModelError, match=f"transformers {version} is installed.*TPSURGERY_UNVERIFIED"):
        versions.check_versions({"transformers": version, "nnsight": "0.8.1"})
    monkeypatch.setenv("TPSURGERY_UNVERIFIED_VERSIONS", "1")  # the override: a warning instead
    with pytest.warns(UserWarning, match="running anyway"):
        versions.check_versions({"transformers": version, "nnsight": "0.8.1"})


@pytest.mark.reliability(item=9, before='raw traceback', now='clear error')
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(saved, tmp_path):
    """A Ctrl-C while torch was still importing printed a KeyboardInterrupt traceback."""
    import signal
    import time

    (tmp_path / "in.txt").write_text("one\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", "from tpsurgery.cli import main; main()",
                             *_embed_args(saved, tmp_path / "in.txt", tmp_path / "o.npy")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    time.sleep(1.5)  # well inside start-up: torch, transformers and the model load take seconds
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err and lines == [lines[0]], err[-3000:]
    assert lines[0].startswith("interrupted")


@pytest.mark.reliability(item=9, before='raw traceback', now='clear error')
def test_a_malformed_expected_file_is_exit_2_naming_the_entry_and_a_hash_mismatch_shows_both(tmp_path):
    """`regress` with {"expected": {"r": {"score": ...}}}: KeyError 'scores', rc 1 (the code of a real regression)."""
    from tpsurgery.evaluation import write_results

    results = write_results(tmp_path / "r.json", [{"recipe": {"name": "r", "hash": "h1"}, "scores": {"t": 70.0}}])
    for body, fragment in (({"expected": {"r": {"score": {"t": 70}}}}, 'expected.r: needs "scores"'),
                           ({"expected": {"r": {"scores": {"t": "70"}}}}, "expected.r.scores.t: a number"),
                           ({"tol": "x", "expected": {}}, "tol must be a number")):
        (tmp_path / "e.json").write_text(json.dumps(body))
        done = _cli("regress", str(results), str(tmp_path / "e.json"))
        assert done.returncode == 2 and fragment in done.stderr and "Traceback" not in done.stderr, done.stderr
    (tmp_path / "e.json").write_text(json.dumps({"expected": {"r": {"scores": {"t": 60.0}, "recipe_hash": "h0"}}}))
    done = _cli("regress", str(results), str(tmp_path / "e.json"))
    assert done.returncode == 1 and "h1" in done.stdout and "h0" in done.stdout, done.stdout
    assert "improved" in done.stdout  # the recipe's score check is not hidden by the mismatch


# --------------------------------------------------------------------- 24.6 regress --write-expected; the doc's CI
@pytest.mark.reliability(item='24.6', before='missing', now='correct')
def test_regress_write_expected_pins_the_results(tmp_path):
    from tpsurgery.evaluation import write_results

    results = write_results(tmp_path / "r.json", [{"recipe": {"name": "r", "hash": "h1"}, "scores": {"t": 70.0}}])
    done = _cli("regress", str(results), str(tmp_path / "e.json"), "--write-expected", "--tol", "0.3", "--with-hash")
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["tol"] == 0.3 and doc["expected"]["r"] == {"scores": {"t": 70.0}, "model": None, "recipe_hash": "h1"}
    assert _cli("regress", str(results), str(tmp_path / "e.json")).returncode == 0
    done = _cli("regress", str(results), str(results), "--write-expected")  # never over the results themselves
    assert done.returncode == 2 and "is the input file" in done.stderr


def _doc_block(path: Path, heading: str) -> list[str]:
    """The command lines of the first fenced block after ``heading`` in a markdown file."""
    text = path.read_text(encoding="utf-8")
    block = text[text.index(heading):].split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]


@pytest.mark.reliability(item='24.6', before='missing', now='correct')
@pytest.mark.slow
@pytest.mark.skipif(not (SAMPLES.parent / "senteval").is_dir(), reason="no SentEval data")
def test_the_ci_recipe_in_docs_evaluation_md_runs_as_written(tmp_path):
    """docs/evaluation.md's regression recipe, run line by line in a shell, `tpsurgery` being this checkout's CLI."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
    lines = _doc_block(docs, "## Regression checks")
    assert any("--write-expected" in line for line in lines) and any(line.startswith("tpsurgery regress") and
                                                                      "--write-expected" not in line for line in lines)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tpsurgery").write_text(f"#!/bin/sh\nexec {sys.executable} -c 'from tpsurgery.cli import main; "
                                       "main()' \"$@\"\n")
    os.chmod(bin_dir / "tpsurgery", 0o755)
    (tmp_path / "data").symlink_to(SAMPLES.parent / "senteval")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TPSURGERY_CACHE")  # the user's cache, where `tpsurgery fetch-model` put the default model
    env.update({"TPSURGERY_CACHE": USER_CACHE} if USER_CACHE else {})
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    doc = json.loads((tmp_path / "expected.json").read_text())
    doc["expected"] = {k: {**v, "scores": {t: s + 5 for t, s in v["scores"].items()}} for k, v in doc["expected"].items()}
    (tmp_path / "expected.json").write_text(json.dumps(doc))  # a drop of 5 points must fail the last line
    done = subprocess.run(lines[-1], shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1 and "regressed" in done.stdout, done.stdout


# ------------------------------------------------------------------------------------------------ 13. smaller
@pytest.mark.reliability(item=13, before='silent wrong', now='clear error')
def test_an_error_names_the_input_line_not_the_index_in_its_chunk(saved, tmp_path):
    from tpsurgery.embed_file import EmbedOptions, embed_file

    inp = tmp_path / "in.txt"
    inp.write_text("a b\nc d\ne f\n\ng h\n", encoding="utf-8")  # line 4 is empty: mean pooling has nothing to pool
    emb = tpsurgery.apply(saved[1], {**REC, "pooling": "mean"}, tokenizer=saved[2])
    with pytest.raises(tpsurgery.InputError, match=r"--input line 4: .*mean pooling"):
        embed_file(emb, inp, tmp_path / "o.npy", EmbedOptions(progress=False, chunk_lines=2))


@pytest.mark.reliability(item=13, before='data lost', now='correct')
def test_sigterm_removes_the_reserved_temporary_file(saved, tmp_path):
    import signal
    import time

    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(f"line {i} " + "z " * (i % 7) for i in range(20000)), encoding="utf-8")
    out = tmp_path / "out" / "o.npy"
    proc = subprocess.Popen([sys.executable, "-c", "from tpsurgery.cli import main; main()",
                             *_embed_args(saved, inp, out, "--no-resume")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((tmp_path / "out").glob(".o.npy.*.tmp")):
        time.sleep(0.05)
    assert list((tmp_path / "out").glob(".o.npy.*.tmp")), "the run never reserved its output"
    time.sleep(1.0)  # into the embedding
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------- 12. a 1 MB line; a max_length option
@pytest.mark.reliability(item=12, before="hang", now="correct")
def test_a_megabyte_line_is_cut_by_characters_first_with_the_same_result(saved):
    """One 1 MB line took 42 s and 1.3 GB on a tiny model: it is now cut to a prefix that can still matter."""
    import time

    from tpsurgery.prompts import char_bound

    emb = tpsurgery.apply(saved[1], REC, tokenizer=saved[2], max_length=48)
    bound = char_bound(saved[2], 48)
    line = "word " * 200_000
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="truncated to the model's limit of 48 tokens"):
        big = emb.encode([line])
    assert time.perf_counter() - t0 < 30
    with pytest.warns(UserWarning, match="truncated"):
        same = emb.encode([line[: bound + 7]])  # a line just over the bound: the binary search over all of it
    np.testing.assert_array_equal(big, same)
    assert emb.tokenize([line], REC["prompt"], warn=False)[0].ids.__len__() == 48
    with pytest.raises(tpsurgery.InputError, match="beyond the model's limit"):
        tpsurgery.apply(saved[1], REC, tokenizer=saved[2], max_length=10**9)


# ------------------------------------------------------------- 11. every problem in one round; config, not weights
@pytest.mark.reliability(item=11, before="missing", now="clear error")
def test_validate_lists_schema_op_run_and_layer_problems_at_once_from_the_config_alone(saved, tmp_path):
    import shutil

    folder = tmp_path / "config-only"
    shutil.copytree(saved[0] / "model", folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()  # --model reads the config and tokenizer, never the weights
    n = saved[1].config.num_hidden_layers
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "prompt": 'This : <PST> "{text}" means', "pooling": "bogus", "tp": {"start": 1, "stop": n + 5},
        "edits": [{"site": "layer_in", "layers": n + 20, "op": "scale"},
                  {"site": "layer_in", "layers": 1, "rows": "last", "op": "add", "run": "nothere"}]}))
    result = CliRunner().invoke(app, ["recipe", "validate", str(bad), "-m", str(folder)])
    assert result.exit_code == 1, result.output
    for field in ("`pooling`", "`edits.0.factor`", "`edits.1.run`", "`tp.stop`", "`edits.0.layers`"):
        assert field in result.output, (field, result.output)
    limit = tpsurgery.apply(saved[1], REC, tokenizer=saved[2]).max_length
    long = tmp_path / "long.yaml"
    long.write_text(yaml.safe_dump({"prompt": "word " * (limit + 10) + "{text}"}))
    result = CliRunner().invoke(app, ["recipe", "validate", str(long), "-m", str(folder)])
    assert result.exit_code == 1 and "longer than the model's limit" in result.output, result.output
    ok = CliRunner().invoke(app, ["recipe", "validate", str(saved[0] / "r.yaml"), "-m", str(folder)])
    assert ok.exit_code == 0 and f"{n} decoder layers" in ok.output, ok.output


@pytest.mark.reliability(item=13, before="silent wrong", now="correct")
def test_a_resumed_encode_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    """The batches left after an interruption were composed by the remaining texts' median length: 20 of 6,000 rows
    differed by 7e-9 from a clean run (docs promise bitwise)."""
    from tpsurgery.cache import EmbeddingCache

    model, tok = tiny_model("llama", seed=4)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "x"]  # half long, half short: the median moves once long ones are done
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 80) if i % 2 else rng.randint(1, 6)))
             + f" {i}" for i in range(80)]
    shapes = []

    def record(module, args, kwargs):  # the [batch, length] of every batch layer 0 runs
        h = args[0] if args else kwargs["hidden_states"]
        shapes.append(tuple(h.shape[:2]))
        if len(shapes) == 4 and stopping:
            raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(observer(record), with_kwargs=True)  # a watcher, not an edit
    try:
        stopping = False
        clean = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=EmbeddingCache(tmp_path / "b")).encode(
            texts, batch_size=6)
        clean_shapes, shapes[:] = list(shapes), []
        stopping = True
        emb = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=EmbeddingCache(tmp_path / "a"))
        with pytest.raises(KeyboardInterrupt):
            emb.encode(texts, batch_size=6)
        done, shapes[:], stopping = shapes[:3], [], False
        resumed = emb.encode(texts, batch_size=6)
    finally:
        handle.remove()
    assert emb.embedding_cache.hits > 0  # the finished batches came from the cache
    assert done + shapes == clean_shapes  # the batches left are those of the uninterrupted run
    np.testing.assert_array_equal(resumed, clean)


@needs_samples
@pytest.mark.reliability(item=13, before="silent wrong", now="clear error")
def test_eval_says_why_a_score_is_nan(saved, tmp_path):
    rec = {**REC, "exit_layer": -1, "edits": [{"site": "layer_in", "layers": 3, "rows": "last", "op": "scale",
                                               "factor": 1e30}]}
    (tmp_path / "r.yaml").write_text(json.dumps(rec), encoding="utf-8")
    done = _cli("eval", "sts", "-r", str(tmp_path / "r.yaml"), "-m", str(saved[0] / "model"), "-d", str(SAMPLES),
                "--tasks", "stsb", "--no-progress", "--no-resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stsb nan (undefined: every pair got the same similarity" in done.stderr, done.stderr[-2000:]
    assert "not finite or all zero" in done.stderr


@pytest.mark.reliability(item=13, before="silent wrong", now="correct")
def test_a_fresh_run_with_repeated_lines_reports_no_resume(tmp_path):
    """"resumed: 311 texts" on a fresh run: a line repeated in a later chunk hit the row this run had just stored.
    Only rows an earlier run stored count; a real resume still reports them."""
    from tpsurgery.cache import EmbeddingCache
    from tpsurgery.embed_file import EmbedOptions, embed_file

    model, tok = tiny_model("llama", seed=4)
    src = tmp_path / "in.txt"
    src.write_text("".join(f"{t}\n" for t in ["a cat", "a dog", "a cat", "a dog", "a cow", "a cat"]), encoding="utf-8")
    options = EmbedOptions(batch_size=2, chunk_lines=2, progress=False)

    def run(out: str):
        emb = tpsurgery.apply(model, REC, tokenizer=tok, embedding_cache=EmbeddingCache(tmp_path / "c"))
        return embed_file(emb, src, tmp_path / out, options), emb.embedding_cache

    fresh, cache = run("a.npy")
    assert cache.hits == 3 and fresh.cached == 0  # the repeats came from this run's own rows
    again, _ = run("b.npy")
    assert again.cached == 6  # every line from the earlier run
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
