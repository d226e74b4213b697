"""What makes an embedding besides the model, tokenizer and recipe: tpsurgery's own code and the libraries it runs on.

A development checkout stays version 0.1.0 across commits, so anything read back from disk (the embedding cache,
stored sweeps, the part files a restarted multi-process ``embed`` reuses) is keyed by :func:`build_info`: a
fingerprint of the package's Python sources (computed once per process) and the versions of torch, transformers,
nnsight and TransformerLens. A change to the TP copy op, or a library upgrade, is then a cache miss, and
``tpsurgery eval`` followed by ``tpsurgery regress`` measures the code that is installed (issue 22).

>>> info = build_info()
>>> sorted(info["libraries"]), len(info["code"])
(['nnsight', 'torch', 'transformer-lens', 'transformers'], 16)
>>> info["code"] == code_fingerprint()   # memoized: the sources are read once per process
True
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

#: the libraries whose versions are part of every on-disk key (their numerics decide the embeddings)
LIBRARIES = ("torch", "transformers", "nnsight", "transformer-lens")

PACKAGE = Path(__file__).resolve().parent


def source_fingerprint(root: Path) -> str:
    """SHA-256 (16 hex digits) over the relative path and bytes of every ``*.py`` file under ``root``.

    >>> import shutil, tempfile
    >>> copy = Path(tempfile.mkdtemp()) / "pkg"; _ = shutil.copytree(PACKAGE, copy)
    >>> before = source_fingerprint(copy)
    >>> with open(copy / "foreign.py", "a") as f: _ = f.write("# one more line\\n")
    >>> source_fingerprint(copy) == before, before == source_fingerprint(PACKAGE)
    (False, True)
    """
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The fingerprint of this tpsurgery's own sources (:func:`source_fingerprint` of the package, once a process)."""
    return source_fingerprint(PACKAGE)


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """``{package: installed version or None}`` for :data:`LIBRARIES`."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_info() -> dict[str, Any]:
    """``{"code": code fingerprint, "libraries": versions}``: part of every key of results read back from disk."""
    return {"code": code_fingerprint(), "libraries": dict(library_versions())}
