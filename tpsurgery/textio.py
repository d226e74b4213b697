"""Input lines and output files of the CLI: read lazily, checked before the work, written atomically.

Lines are separated by ``'\\n'`` only; a ``'\\r'`` ending a line (CRLF files) is dropped and a UTF-8 byte-order mark
opening the file is not text. Nothing else splits a line (U+2028, U+0085, form feed, ``\\x1c``-``\\x1e``, a lone
``'\\r'`` stay inside it), so row ``i`` of the output is line ``i + 1`` of the file and there are as many rows as
lines (a last line without ``'\\n'`` counts; an empty file has none).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "in.txt"
>>> _ = p.write_bytes("\\ufeffa\\r\\nb\\x0cc\\u2028d\\rX\\n\\nlast".encode())
>>> list(iter_lines(p)), count_lines(p)
(['a', 'b\\x0cc\\u2028d\\rX', '', 'last'], 4)
>>> [(start, len(c)) for start, c in chunked(iter(range(5)), 2)]
[(0, 2), (2, 2), (4, 1)]
"""

from __future__ import annotations

import codecs
import errno
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

_BOM = codecs.BOM_UTF8


def _unreadable(path: Path, why: Any) -> InputError:
    return InputError(None, f"cannot read --input {path} as UTF-8 text: {why}")


def iter_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file, one at a time (see the module doc for what a line is)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with f:
        for n, raw in enumerate(f):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            if n == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _unreadable(path, f"line {n + 1}: {exc}") from None


STDIN_NAMES = ("-", "/dev/stdin", "/proc/self/fd/0", "/dev/fd/0")


def _kind(mode: int) -> str:
    import stat

    return ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
            "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a folder" if stat.S_ISDIR(mode) else "not a regular file")


def is_stdin(path: str | os.PathLike) -> bool:
    """Whether ``path`` names standard input: ``-``, or ``/dev/stdin`` when that is not a regular file (a pipe)."""
    import stat

    if str(path) not in STDIN_NAMES:
        return False
    if str(path) == "-":
        return True
    try:
        return not stat.S_ISREG(os.fstat(0).st_mode)
    except OSError:
        return False


def check_regular(path: str | os.PathLike, what: str = "--input") -> Path:
    """``path`` if it is a regular file (symlinks followed); a device, FIFO or socket is refused before it is opened
    (``/dev/zero`` would be read until memory runs out, a FIFO without a writer hangs).

    >>> check_regular("/dev/null")
    Traceback (most recent call last):
    ...
    tpsurgery.errors.InputError: --input /dev/null is a character device, not a regular file; give a text file (standard input: --input -)
    """
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc) if what == "--input" else InputError(None, f"cannot read {what} {path}: {exc}") \
            from None
    if not stat.S_ISREG(st.st_mode):
        hint = "; give a text file (standard input: --input -)" if what == "--input" else ""
        head = f"{what} {path} is" if what == "--input" else f"cannot read {what} {path}: it is"
        raise InputError(None, f"{head} {_kind(st.st_mode)}, not a regular file{hint}")
    return path


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (more is an error): the bound holds whatever
    the file's size says (``/proc`` files and devices report 0)."""
    path = check_regular(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(None, f"cannot read {what} {path}: {exc}") from None
    if len(data) > limit:
        raise InputError(None, f"{what} {path} is larger than {limit} bytes")
    return data


class InputSnapshot:
    """The input file's identity when it was counted: reading it later checks it is still that file, unchanged
    (a file that shrinks or grows during a run would give rows that are not its lines)."""

    def __init__(self, path: Path):
        st = os.stat(path)
        self.path, self.key = path, (st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self, lines_read: int, lines_counted: int) -> None:
        try:
            st = os.stat(self.path)
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now != self.key or lines_read != lines_counted:
            raise InputError(None, f"--input {self.path} changed while it was read ({lines_counted} lines counted, "
                                   f"{lines_read} read); nothing was written. Embed a copy that nothing writes to")


def spool_stdin(output: Path) -> Path:
    """Standard input copied, once, into a temporary file beside ``output`` (removed by the caller, or as an orphan by
    the next run): a pipe can be read only once, and the embedding needs the line count first."""
    import sys

    fd, tmp = temp_file(output)
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(output, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def count_lines(path: str | os.PathLike) -> int:
    """How many lines :func:`iter_lines` yields, in one fast pass over the bytes that also checks they are UTF-8
    (so a bad file fails before any model is loaded)."""
    path = Path(path)
    n, last = 0, b"\n"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    line = n + block[: max(exc.start, 0)].count(b"\n") + 1
                    raise _unreadable(path, f"line {line}: {exc}") from None
                n += block.count(b"\n")
                last = block[-1:]
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _unreadable(path, f"line {n + 1}: {exc}") from None  # a multi-byte character cut at the end
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return n + (last != b"\n")


def chunked(items: Iterator[Any], size: int) -> Iterator[tuple[int, list]]:
    """``(offset, up to size items)`` from an iterator, without reading ahead more than one chunk."""
    start = 0
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield start, chunk
        start += len(chunk)


# ------------------------------------------------------------------------------------------------------- output
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_orphans(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporary files and folders (``.NAME.PID.xxx.tmp``) left in ``folder`` by killed runs (whose process
    is gone): half-written outputs, half-converted models."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if m and (name is None or m["name"] == name) and not _pid_alive(int(m["pid"])):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def temp_file(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new temporary file beside ``path`` named ``.NAME.PID.xxx.tmp`` (so later runs can clean orphans)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    return fd, Path(tmp)


def _write_error(path: Path, exc: OSError, what: str = "--output") -> InputError:
    why = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for this file system / limit",
           errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror or exc)
    return InputError(None, f"cannot write {what} {path}: {why}")


def check_output(path: str | os.PathLike, input: str | os.PathLike | None = None, what: str = "--output") -> Path:
    """Fail before any work when ``path`` cannot be written: a folder, a folder that cannot be made or written to,
    an existing file that is not a regular file (``/dev/null``, a FIFO: it would be replaced by a regular file), the
    ``input`` file itself. A symlink at ``path`` is replaced by the new file (its target is left alone), as ``mv``
    would. Orphaned temporary files of ``path`` from killed runs are removed."""
    import stat

    path = Path(path)
    if path.is_dir():
        raise InputError(None, f"{what} {path} is a folder; give a file name, e.g. {path / 'embeddings.npy'}")
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise InputError(None, f"{what} {path} is {_kind(st.st_mode)}, not a regular file: writing there would "
                               "replace it; give a file name")
    if input is not None and st is not None and not is_stdin(input):
        try:
            same = os.path.samefile(path, input)
        except OSError:
            same = False
        if same:
            raise InputError(None, f"{what} {path} is the input file: it would be replaced by the embeddings; give "
                                   "another file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path)
        try:
            os.close(fd)
        finally:  # also when a signal lands here
            tmp.unlink()
    except OSError as exc:
        raise _write_error(path, exc, what) from None
    clean_orphans(path.parent, path.name)
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` via a temporary file and a rename (an interrupt never leaves half a file); the new file's mode
    follows the umask, as a plain ``open`` would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class NpyWriter:
    """A float32 ``.npy`` array of ``shape`` written in place, row ranges at a time, then renamed onto ``path``.

    The space is reserved up front (a full disk fails before the work); rows are written straight to their place in
    a temporary file (no mapping: memory does not grow with the number of rows). ``commit`` renames it into place;
    leaving the ``with`` block without ``commit`` removes it.

    >>> import tempfile, pathlib, numpy as np
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "e.npy"
    >>> with NpyWriter(out, (3, 2)) as w:
    ...     w.write(0, np.ones((2, 2))); w.write(2, np.zeros((1, 2))); _ = w.commit()
    >>> np.load(out).tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...]):
        import numpy as np

        self.path = Path(path)
        self.shape = tuple(shape)
        self.row_bytes = 4 * int(np.prod(self.shape[1:], dtype=np.int64))
        fd, self.tmp = temp_file(self.path)
        self.file: Any = None
        try:
            self.file = os.fdopen(fd, "r+b")
            header = {"descr": "<f4", "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(self.file, header)
            self.offset = self.file.tell()
            size = self.offset + self.row_bytes * self.shape[0]
            if hasattr(os, "posix_fallocate") and size:
                os.posix_fallocate(self.file.fileno(), 0, size)
            else:
                self.file.truncate(size)
        except OSError as exc:
            self._remove()
            raise _write_error(self.path, exc) from None
        except BaseException:
            self._remove()
            raise

    def write(self, start: int, rows: Any) -> None:
        """Rows ``start .. start + len(rows)`` of the array."""
        import numpy as np

        rows = np.ascontiguousarray(rows, dtype="<f4")
        self.file.seek(self.offset + start * self.row_bytes)
        try:
            self.file.write(rows.tobytes())
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def commit(self) -> Path:
        """Flush and rename into place. On failure the rows stay in the temporary file, whose path the error names."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            os.chmod(self.tmp, umask_mode())
            os.replace(self.tmp, self.path)
        except OSError as exc:
            if self.file is not None:  # keep what was written: the error says where
                try:
                    self.file.close()
                except OSError:
                    pass
                self.file = None
            err = _write_error(self.path, exc)
            raise InputError(None, f"{err}; the embeddings computed so far are kept in {self.tmp}") from None
        return self.path

    def _remove(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if self.file is not None:  # not committed: remove the temporary file
            self._remove()
