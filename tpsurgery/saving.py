"""Embeddings saved with their provenance: ``Embedder.save(path, texts)`` and ``tpsurgery.load_embeddings(path)``.

One ``.npz`` file (NumPy, no pickle): the float32 matrix, the texts (unless ``store_texts=False``; their SHA-256 is
always kept) and a JSON provenance record: the recipe and its hash, the exit layer as a ``hidden_states`` index, the
model's name and exact fingerprint (:func:`tpsurgery.cache.model_fingerprint`), the tokenizer's, backend, device,
dtype, whether the rows are L2-normalized (``l2_normalized``) and how save got them (``encoded_by_save``; when it
encoded them, ``normalize_embeddings``), and the versions of Python, tpsurgery, torch, transformers, nnsight and
numpy. Vectors already computed go in as ``embeddings=``, unchanged:

>>> import tempfile, tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama")
>>> emb = tpsurgery.apply(model, "prompt: '<PST> {text} means'\\ntp: {start: 1, stop: 2}", tokenizer=tok)
>>> path = emb.save(tempfile.mkdtemp() + "/emb.npz", ["a b", "c"])
>>> saved = tpsurgery.load_embeddings(path)
>>> saved.embeddings.shape, saved.texts, saved.provenance["exit_layer"], saved.provenance["recipe_hash"] == emb.recipe.hash()
((2, 32), ['a b', 'c'], 4, True)
>>> vectors = emb.encode(["a b", "c"], normalize_embeddings=True)
>>> p = tpsurgery.load_embeddings(emb.save(path, ["a b", "c"], embeddings=vectors)).provenance
>>> p["l2_normalized"], p["encoded_by_save"], p["normalize_embeddings"]
(True, False, None)
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .textio import atomic_write

FORMAT = "tpsurgery_embeddings"
PACKAGES = ("tpsurgery", "torch", "transformers", "nnsight", "transformer-lens", "numpy")


def texts_sha256(texts: Sequence[str]) -> str:
    """SHA-256 of the texts as a JSON list (order and duplicates matter)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def versions() -> dict[str, str | None]:
    """Python and package versions (None for a package that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(embedder: Any, texts: Sequence[str], embeddings: np.ndarray,
               how: dict[str, Any] | None = None) -> dict[str, Any]:
    """What made these embeddings (see the module docstring); ``how``: how save got them (``encoded_by_save``,
    ``normalize_embeddings``)."""
    from .cache import model_fingerprint, tokenizer_fingerprint

    param = next(embedder.model.parameters())
    norms = np.linalg.norm(embeddings, axis=-1) if len(embeddings) else np.ones(1)
    return {
        FORMAT: 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": embedder.recipe.to_dict(), "recipe_hash": embedder.recipe.hash(),
        "exit_layer": embedder.plan.exit_layer, "n_layers": embedder.n_layers,
        "model": embedder.model_name, "model_fingerprint": model_fingerprint(embedder.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(embedder.tokenizer), "backend": embedder.backend.name,
        "device": param.device.type, "dtype": str(param.dtype).removeprefix("torch."),
        "n": int(embeddings.shape[0]), "dim": int(embeddings.shape[-1]),
        "l2_normalized": bool(np.allclose(norms, 1.0, atol=1e-4)), **(how or {}),
        "texts_sha256": texts_sha256(texts), "versions": versions(),
    }


@dataclass(frozen=True)
class SavedEmbeddings:
    """Embeddings read back by :func:`load_embeddings`: ``embeddings`` ``[n, d]`` float32, ``texts`` (None when
    they were not stored) and the ``provenance`` record. ``np.asarray(saved)`` is the matrix."""

    embeddings: np.ndarray
    texts: list[str] | None
    provenance: dict[str, Any]

    def __len__(self) -> int:
        return len(self.embeddings)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.embeddings if dtype is None else self.embeddings.astype(dtype)


def save_embeddings(path: str | os.PathLike, embedder: Any, texts: Sequence[str], embeddings: Any,
                    store_texts: bool = True, how: dict[str, Any] | None = None) -> Path:
    """Write ``embeddings`` of ``texts`` made by ``embedder`` to ``path`` (``.npz``), atomically."""
    matrix = np.asarray(embeddings, dtype=np.float32)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if matrix.ndim == 1:
        matrix = matrix[None]
    if matrix.shape[0] != len(texts):
        raise InputError(None, f"{len(texts)} texts but {matrix.shape[0]} embeddings: they must match row for row")
    record = provenance(embedder, texts, matrix, how)
    arrays = {"embeddings": matrix, "provenance": np.array(json.dumps(record))}
    if store_texts:
        arrays["texts"] = np.array(json.dumps(texts, ensure_ascii=False))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue())  # a temporary file and a rename; the file's mode follows the umask


def load_embeddings(path: str | os.PathLike) -> SavedEmbeddings:
    """Read a file written by ``Embedder.save``; the stored texts are checked against their recorded hash."""
    try:
        with np.load(path, allow_pickle=False) as z:
            matrix = z["embeddings"]
            record = json.loads(str(z["provenance"]))
            texts = json.loads(str(z["texts"])) if "texts" in z.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(None, f"{path} is not an embeddings file written by Embedder.save: {exc}") from None
    if record.get(FORMAT) != 1:
        raise InputError(None, f"{path}: unknown embeddings format {record.get(FORMAT)!r} (this version reads 1)")
    if texts is not None and texts_sha256(texts) != record["texts_sha256"]:
        raise InputError(None, f"{path}: the stored texts do not match their recorded SHA-256 (the file was edited?)")
    return SavedEmbeddings(matrix, texts, record)
