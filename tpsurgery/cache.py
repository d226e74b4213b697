"""An optional on-disk embedding cache: re-evaluations are instant and never stale.

Entries are keyed by (model fingerprint, tokenizer fingerprint, plan key, text). The model fingerprint hashes the
model class, its config, and the raw bytes of every parameter and buffer (SHA-256; about 1 s for SmolLM2-135M on
CPU), memoized per model object for as long as no tensor was replaced or modified in place (torch bumps a tensor's
version counter on every in-place write). The plan key covers the recipe's semantics (``Recipe.hash``), the compiled
plan (resolved exit layer, TP layers, placeholder vector, ...), ``all_layers``, the backend, the device type, the
tpsurgery version, a fingerprint of tpsurgery's own sources and the versions of torch, transformers, nnsight and
TransformerLens (:mod:`tpsurgery.buildinfo`: a development checkout stays one version across commits). Storage is one SQLite file; each ``put`` is one transaction, so a crash never leaves half an entry.

Each row carries a digest of its key and bytes: a cache file that SQLite cannot read, or a row whose digest does not
match (a garbled file), is never trusted: the file is moved aside (``embeddings.sqlite.corrupt-<time>``) with a
warning and a fresh cache is started. A cache that cannot be written (a read-only folder or file) gives one warning
and the work goes on without storing (reads still hit where the file can be read).

>>> import tempfile, numpy as np
>>> cache = EmbeddingCache(tempfile.mkdtemp())
>>> cache.put("k", {"a": np.ones(3, np.float32)})
>>> cache.get("k", ["a", "b"])["a"].tolist(), list(cache.get("k", ["b"]))
([1.0, 1.0, 1.0], [])
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ._version import __version__
from .buildinfo import build_info
from .errors import ModelError

CACHE_FORMAT = 2  # 2: rows carry a digest (table emb2); format-1 rows are ignored


def _tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def weights_token(model: Any) -> int:
    """A cheap token that changes whenever a parameter or buffer is replaced, moved, or written in place.

    >>> from tpsurgery.testing import tiny_model
    >>> m = tiny_model("llama")[0]; t = weights_token(m)
    >>> with torch.no_grad(): _ = m.model.norm.weight.mul_(2)
    >>> weights_token(m) == t
    False
    """
    return hash(tuple((name, t.data_ptr(), t._version, t.dtype, t.device.type) for name, t in _tensors(model)))


def _offloaded(model: Any, name: str) -> torch.Tensor:
    """The value of an offloaded tensor (on the ``meta`` device) from the accelerate hook that loads it when it runs."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):  # the owning module first, then modules that place their submodules
        hook = vars(model.get_submodule(".".join(parts[:k]))).get("_hf_hook")
        for h in (hook, *getattr(hook, "hooks", ())):
            weights = getattr(h, "weights_map", None)
            if getattr(h, "offload", False) and weights is not None and ".".join(parts[k:]) in weights:
                return weights[".".join(parts[k:])]
    raise ModelError(f"model tensor {name} is on the meta device and no accelerate hook loads it: cannot fingerprint "
                     "the model for the embedding cache (load the weights, or turn the embedding cache off)")


_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: Any) -> str:
    """SHA-256 over the model class, config and every parameter's and buffer's bytes (memoized while unchanged).

    >>> from tpsurgery.testing import tiny_model
    >>> a = tiny_model("llama", seed=0)[0]
    >>> model_fingerprint(a) == model_fingerprint(tiny_model("llama", seed=0)[0]) != model_fingerprint(tiny_model("llama", seed=1)[0])
    True
    """
    token = weights_token(model)
    hit = _FINGERPRINTS.get(model)
    if hit is not None and hit[0] == token:
        return hit[1]
    h = hashlib.sha256(type(model).__qualname__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        d.pop("_name_or_path", None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in _tensors(model):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.is_meta:  # offloaded by accelerate (device_map with "cpu"/"disk" entries): hash the stored value
                t = _offloaded(model, name)
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    digest = h.hexdigest()[:32]
    _FINGERPRINTS[model] = (token, digest)
    return digest


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def plan_key(recipe: Any, plan: Any, *, all_layers: bool, backend: str, device: str) -> str:
    """What, besides model and tokenizer, decides an embedding: recipe semantics, the compiled plan, the engine."""
    fields = dict(vars(plan))  # edits' vectors enter by their content hash (Vector's repr)
    body = dict(format=CACHE_FORMAT, version=__version__, build=build_info(), recipe=recipe.hash(), plan=fields,
                all_layers=all_layers, backend=backend, device=device)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


class EmbeddingCache:
    """Embeddings on disk under ``directory`` (default: ``$TPSURGERY_EMBEDDING_CACHE``, else
    ``<tpsurgery cache>/embeddings``), one SQLite file."""

    def __init__(self, directory: str | os.PathLike | None = None):
        if directory is None and os.environ.get("TPSURGERY_EMBEDDING_CACHE"):
            directory = os.environ["TPSURGERY_EMBEDDING_CACHE"]
        if directory is None:
            from .models import cache_dir

            directory = cache_dir() / "embeddings"
        from .models import check_cache_tree, make_dirs

        self.directory = Path(directory).expanduser()
        self.path = self.directory / "embeddings.sqlite"
        self.hits = 0
        self.misses = 0
        self.earlier_hits = 0  # hits on rows this object did not store (an earlier run's work, not a repeated text)
        self._stored: set[bytes] = set()
        self.readable = self.writable = True
        try:
            make_dirs(self.directory)  # 0o755 whatever the umask; refuse a folder others own or may write to
        except OSError as exc:
            self._unusable(exc, write_only=False)
            return
        check_cache_tree(self.directory)  # and every folder above it in the tpsurgery cache
        if not self.path.exists():
            self._guard(lambda con: None, None, write=True)
            if self.path.exists():
                os.chmod(self.path, 0o644)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            con.execute("CREATE TABLE IF NOT EXISTS emb2 (k TEXT PRIMARY KEY, shape TEXT NOT NULL, v BLOB NOT NULL, "
                        "h BLOB NOT NULL)")
        except sqlite3.OperationalError as exc:  # a read-only file or folder: reads may still work
            if "readonly" not in str(exc) and "read-only" not in str(exc):
                con.close()
                raise
        return con

    def _unusable(self, exc: BaseException, write_only: bool) -> None:
        if self.writable:  # one warning per cache object
            warnings.warn(f"the embedding cache {self.path} cannot be {'written' if write_only else 'used'} ({exc}); "
                          "going on without storing embeddings", UserWarning, stacklevel=4)
        self.writable = False
        self.readable = self.readable and write_only

    def _guard(self, action: Any, default: Any, write: bool) -> Any:
        """``action(connection)``; a corrupt file is moved aside and the action retried once on a fresh one; a file
        or folder that cannot be written or opened is warned about once and skipped from then on."""
        if not (self.writable if write else self.readable):
            return default
        for attempt in (0, 1):
            try:
                con = self._connect()
                try:
                    return action(con)
                finally:
                    con.close()
            except _Corrupt as exc:
                self._move_aside(str(exc))
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _corrupt_message(exc):
                    self._unusable(exc, write_only=write and "readonly" in str(exc))
                    return default
                self._move_aside(str(exc))
            except OSError as exc:
                self._unusable(exc, write_only=write)
                return default
        return default

    def _move_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            self._unusable(exc, write_only=False)
            return
        warnings.warn(f"the embedding cache {self.path} is unreadable or corrupt ({why}); moved it to {aside} and "
                      "started a fresh one (nothing in it was used)", UserWarning, stacklevel=5)

    @staticmethod
    def _row_key(key: str, text: str) -> str:
        return hashlib.sha256(f"{key}\0{text}".encode()).hexdigest()

    @staticmethod
    def _digest(row_key: str, shape: str, value: bytes) -> bytes:
        return hashlib.blake2b(f"{row_key}{shape}".encode() + value, digest_size=16).digest()

    def get(self, key: str, texts: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached float32 embeddings of those ``texts`` that have one under ``key``."""
        texts = list(texts)
        by_row = {self._row_key(key, t): t for t in texts}

        def read(con: sqlite3.Connection) -> dict[str, np.ndarray]:
            out: dict[str, np.ndarray] = {}
            rows = list(by_row)
            for k in range(0, len(rows), 500):
                chunk = rows[k: k + 500]
                q = f"SELECT k, shape, v, h FROM emb2 WHERE k IN ({','.join('?' * len(chunk))})"
                for rk, shape, v, h in con.execute(q, chunk):
                    if not isinstance(v, bytes) or h != self._digest(rk, shape, v):
                        raise _Corrupt(f"row {rk[:12]} does not match its digest")
                    out[by_row[rk]] = np.frombuffer(v, dtype=np.float32).reshape(json.loads(shape)).copy()
            return out

        out = self._guard(read, {}, write=False)
        self.hits += len(out)
        self.earlier_hits += sum(bytes.fromhex(rk)[:16] not in self._stored for rk, t in by_row.items() if t in out)
        self.misses += len(texts) - len(out)
        return out

    def put(self, key: str, embeddings: Mapping[str, np.ndarray]) -> None:
        """Store embeddings (one transaction: all or nothing)."""
        rows = []
        for t, e in embeddings.items():
            rk, shape, v = self._row_key(key, t), json.dumps(list(e.shape)), np.ascontiguousarray(e, np.float32).tobytes()
            rows.append((rk, shape, v, self._digest(rk, shape, v)))

        def write(con: sqlite3.Connection) -> None:
            with con:
                con.executemany("INSERT OR REPLACE INTO emb2 (k, shape, v, h) VALUES (?, ?, ?, ?)", rows)

        self._guard(write, None, write=True)
        self._stored.update(bytes.fromhex(r[0])[:16] for r in rows)

    def clear(self) -> None:
        """Forget every entry."""
        def wipe(con: sqlite3.Connection) -> None:
            with con:
                con.execute("DELETE FROM emb2")

        self._guard(wipe, None, write=True)


class _Corrupt(Exception):
    """A row that does not match its digest."""


def _corrupt_message(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("malformed", "not a database", "file is encrypted", "corrupt"))


def as_cache(cache: Any) -> EmbeddingCache | None:
    """``None``/``False`` -> no cache; ``True`` -> the default directory; a path -> a cache there; a cache as is."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return EmbeddingCache()
    if isinstance(cache, EmbeddingCache):
        return cache
    return EmbeddingCache(cache)
