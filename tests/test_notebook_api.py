"""What a notebook user expects (issue 14): saved embeddings with provenance, stats, dim / model_name, progress bars
that appear only for long runs, explain in layer ranges."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tpsurgery
from tpsurgery.sharing import encode_schedules
from tpsurgery.saving import texts_sha256
from tpsurgery.testing import tiny_model

RECIPE = "prompt: 'This : <PST> {text} means'\ntp: {start: 1, stop: 3}\nexit_layer: -1"
TEXTS = ["a b c", "d e", "a b c", "f"]


@pytest.fixture(scope="module")
def emb():
    model, tok = tiny_model("qwen2", n_layers=4)
    with tpsurgery.apply(model, RECIPE, tokenizer=tok) as e:
        yield e


def test_saved_embeddings_come_back_with_their_provenance(emb, tmp_path):
    path = emb.save(tmp_path / "e.npz", TEXTS, normalize_embeddings=True)
    saved = tpsurgery.load_embeddings(path)
    assert np.array_equal(np.asarray(saved), emb.encode(TEXTS, normalize_embeddings=True)) and saved.texts == TEXTS
    p = saved.provenance
    assert p["recipe"] == emb.recipe.to_dict() and p["exit_layer"] == 4 and p["l2_normalized"]
    assert p["texts_sha256"] == texts_sha256(TEXTS) and p["versions"]["torch"] and p["dim"] == emb.dim == 32
    from tpsurgery.cache import model_fingerprint

    assert p["model_fingerprint"] == model_fingerprint(emb.model) and p["model"] == emb.model_name
    hidden = tpsurgery.load_embeddings(emb.save(tmp_path / "h.npz", TEXTS[:2], store_texts=False))
    assert hidden.texts is None and hidden.provenance["texts_sha256"] == texts_sha256(TEXTS[:2])


def test_saving_refuses_mismatched_rows_and_loading_refuses_edited_texts(emb, tmp_path):
    with pytest.raises(tpsurgery.InputError, match="3 texts but 2 embeddings"):
        emb.save(tmp_path / "x.npz", TEXTS[:3], np.zeros((2, 32)))
    path = emb.save(tmp_path / "e.npz", TEXTS[:2])
    with np.load(path) as z:
        arrays = dict(z)
    arrays["texts"] = np.array(json.dumps(["edited", "d e"]))
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(tpsurgery.InputError, match="do not match their recorded SHA-256"):
        tpsurgery.load_embeddings(tmp_path / "edited.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(tpsurgery.InputError, match="not an embeddings file"):
        tpsurgery.load_embeddings(tmp_path / "junk.npz")


def test_stats_count_time_throughput_and_memory():
    model, tok = tiny_model("llama")
    with tpsurgery.apply(model, RECIPE, tokenizer=tok) as e:
        e.encode(TEXTS)
        e.encode("g h")
        s = e.stats
        assert s.texts == 5 and s.rows == 4 and s.seconds > 0 and s.texts_per_second > 0 and s.tokens_per_second > 0
        assert s.peak_memory_mb is None or s.peak_memory_mb > 0
        assert "5 texts in" in str(s) and "texts/s" in str(s)
        seconds = s.seconds
        plans = [e.plan_for(e.recipe.replace(exit_layer=k)) for k in (1, 2)]
        encode_schedules(e, TEXTS, plans)  # a sweep's reads count like encode's: texts, batches and time
        assert s.texts == 9 and s.rows > 4 and s.seconds > seconds


def test_progress_bars_appear_only_when_asked_or_when_a_run_is_long(emb, capsys, monkeypatch):
    emb.encode(TEXTS)  # default: a bar only after PROGRESS_DELAY_S seconds; this run is far shorter
    assert "encode" not in capsys.readouterr().err
    emb.encode(TEXTS, show_progress_bar=True)
    assert "encode" in capsys.readouterr().err
    monkeypatch.setattr("tpsurgery.batching.PROGRESS_DELAY_S", 0.0)  # a "long" run: the default shows the bar
    emb.encode(TEXTS)
    assert "encode" in capsys.readouterr().err
    emb.encode(TEXTS, show_progress_bar=False)
    assert "encode" not in capsys.readouterr().err


def test_saved_embeddings_file_mode_follows_the_umask(emb, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = emb.save(tmp_path / "e.npz", TEXTS[:1])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_encode_warnings_point_at_the_callers_line(emb):
    """encode is wrapped (stats timing): its warnings must still name the caller's line, not the wrapper."""
    with pytest.warns(UserWarning, match="truncated") as caught:
        emb.encode(["0 " * 600])
    assert caught[0].filename == __file__


def test_a_bar_opened_late_shows_the_true_rate_and_a_finished_run_once(monkeypatch, capsys):
    """Issue 24: after the delay the bar read `80% 16/20 [00:00<?, ?text/s]` (made then, with the work as `initial`),
    and a run finished by then was drawn twice (`sweep: 100% 8/8` at creation and at close)."""
    import time

    from tpsurgery.batching import Progress

    monkeypatch.setattr("tpsurgery.batching.PROGRESS_DELAY_S", 0.2)
    p = Progress(None, 20)
    time.sleep(0.3)
    p.advance(16)
    shown = str(p.bar)
    assert "16/20" in shown and "?" not in shown and p.bar.format_dict["elapsed"] >= 0.3
    rate = 16 / p.bar.format_dict["elapsed"]
    assert f"{rate:.1f}"[:-2] in shown  # texts per second since the run began (tqdm rounds the last digit)
    p.close()
    capsys.readouterr()
    q = Progress(None, 8, desc="sweep", unit="pair")
    time.sleep(0.3)
    q.advance(8)
    q.close()
    err = capsys.readouterr().err
    assert err.count("sweep: 100%") == 1 and "8/8" in err and "?pair/s" not in err


def test_load_model_shows_no_loading_weights_bar_and_restores_transformers(tmp_path, capfd):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(tmp_path)  # what transformers draws on its own
    assert "Loading weights" in capfd.readouterr().err
    tpsurgery.load_model(tmp_path)
    assert "Loading weights" not in capfd.readouterr().err
    with pytest.raises(tpsurgery.ModelError):
        tpsurgery.load_model(tmp_path / "missing")
    assert hf_logging.is_progress_bar_enabled()  # restored after each load, the failed one too
    if hasattr(hf_logging, "set_tqdm_hook"):  # the hook no_loading_bar sets (newer transformers) is gone again
        previous = hf_logging.set_tqdm_hook(None)
        hf_logging.set_tqdm_hook(previous)
        assert previous is None


def test_save_records_how_it_got_the_vectors_and_keeps_given_ones(emb, tmp_path):
    """Issue 24: after encode(normalize_embeddings=True), a bare save(path, texts) encodes again, unnormalized; the
    provenance says so, embeddings= stores the given vectors unchanged, and mixing both is refused."""
    vectors = emb.encode(TEXTS, normalize_embeddings=True)
    again = tpsurgery.load_embeddings(emb.save(tmp_path / "a.npz", TEXTS))
    p = again.provenance
    assert (p["encoded_by_save"], p["normalize_embeddings"], p["l2_normalized"]) == (True, False, False)
    given = tpsurgery.load_embeddings(emb.save(tmp_path / "g.npz", TEXTS, embeddings=vectors))
    p = given.provenance
    assert (p["encoded_by_save"], p["normalize_embeddings"], p["l2_normalized"]) == (False, None, True)
    assert np.array_equal(given.embeddings, vectors)
    with pytest.raises(tpsurgery.InputError, match=r"embeddings= and encode arguments \(normalize_embeddings\)"):
        emb.save(tmp_path / "x.npz", TEXTS, embeddings=vectors, normalize_embeddings=True)
    assert not (tmp_path / "x.npz").exists()
