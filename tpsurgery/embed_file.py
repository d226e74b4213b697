"""``tpsurgery embed``'s pipeline: a text file's lines -> a float32 ``.npy`` file, one row per line.

Reader (:func:`~tpsurgery.textio.iter_lines`, lazy) -> chunks of ``chunk_lines`` lines -> ``Embedder.encode`` (token
budget batches; with an embedding cache each finished batch is stored, so a rerun resumes) -> writer
(:class:`~tpsurgery.textio.NpyWriter`, memory-mapped, renamed into place at the end). Memory is bounded by the chunk
and the batch, not by the number of lines. Warnings name 1-based line numbers of the file.

>>> import tempfile, pathlib, numpy as np, tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama")
>>> emb = tpsurgery.apply(model, "prompt: '<PST> {text} means'", tokenizer=tok)
>>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "in.txt").write_text("a b\\nc\\u2028d\\n\\n")
>>> embed_file(emb, d / "in.txt", d / "out.npy", EmbedOptions(progress=False)).rows, np.load(d / "out.npy").shape
(3, (3, 32))
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError, TpsurgeryError
from .resources import renumbered
from .textio import (InputSnapshot, NpyWriter, check_output, check_regular, chunked, count_lines, is_stdin, iter_lines,
                     spool_stdin)


@dataclass(frozen=True)
class EmbedOptions:
    """How ``embed_file`` runs: batch limits, L2 normalization, a progress bar, lines per ``encode`` call."""

    batch_size: int = 32
    max_tokens: int | None = None
    normalize: bool = False
    progress: bool = True
    chunk_lines: int = 4096
    label: str = "embed"  # the progress bar's name and terminal row (one per rank under torchrun)
    bar_row: int = 0


@dataclass
class EmbedReport:
    """What was written: rows, their width, and 1-based line numbers that were truncated or came out non-finite;
    ``cached``: texts taken from the embedding cache that an earlier run stored (a resumed run; a line repeated in
    this run does not count); ``reused``: the whole file was a finished part of an earlier multi-process run
    (:func:`~tpsurgery.distributed.embed_shards`)."""

    rows: int = 0
    dim: int = 0
    cached: int = 0
    reused: bool = False
    truncated: list[int] = field(default_factory=list)
    non_finite: list[int] = field(default_factory=list)


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")


def embed_file(emb: Any, input: str | Path, output: str | Path, options: EmbedOptions = EmbedOptions(),
               lines: range | None = None) -> EmbedReport:
    """Embed every line of ``input`` with ``emb`` into ``output`` (see the module doc). Unwritable outputs, an output
    that is the input or not a regular file, and a full disk fail before any embedding is computed; all-non-finite
    output is an error and nothing is written. ``input`` ``-`` (or ``/dev/stdin``) reads standard input, once.
    The rows written are the lines read: an input that changes during the run is an error and nothing is written.

    ``lines``: only these (0-based, a contiguous range: one rank's shard, :mod:`tpsurgery.distributed`), written as
    rows ``0 .. len(lines) - 1``; warnings still name the file's line numbers."""
    output = check_output(output, input)
    spooled = spool_stdin(output) if lines is None and is_stdin(input) else None
    try:
        return _embed_file(emb, spooled or check_regular(input), output, options, lines)
    finally:
        if spooled is not None:
            spooled.unlink(missing_ok=True)


def _embed_file(emb: Any, input: Path, output: Path, options: EmbedOptions, lines: range | None) -> EmbedReport:
    snapshot = InputSnapshot(input)
    span = range(count_lines(input)) if lines is None else lines
    n = len(span)
    report = EmbedReport(rows=n, dim=int(emb.encode([]).shape[-1]))
    cache = getattr(emb, "embedding_cache", None)
    hits = cache.earlier_hits if cache is not None else 0
    bar = None
    if options.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=options.label, unit="line", position=options.bar_row)
    read = 0
    try:
        with NpyWriter(output, (n, report.dim)) as writer:
            for start, chunk in chunked(itertools.islice(iter_lines(input), span.start, span.stop), options.chunk_lines):
                read += len(chunk)
                writer.write(start, _encode_chunk(emb, chunk, span.start + start, options, bar, report))
            snapshot.check(read, n)
            if n and len(report.non_finite) == n:
                raise BackendError(f"the embeddings of all {n} lines are NaN, inf or all zero: the model overflowed "
                                   "or is broken (try float32 or bfloat16); nothing was written")
            writer.commit()
    finally:
        if bar is not None:
            bar.close()
    report.cached = cache.earlier_hits - hits if cache is not None else 0  # a repeated line is no resume
    if report.truncated:
        warnings.warn(f"{len(report.truncated)} line(s) truncated to the model's limit of {emb.max_length} tokens "
                      f"(the end of the sentence is dropped; lines {_lines(report.truncated)})", UserWarning, 3)
    if report.non_finite:
        warnings.warn(f"the embeddings of {len(report.non_finite)} line(s) are not finite or all zero (NaN, inf, or "
                      f"an overflow in the final norm; lines {_lines(report.non_finite)}): the model overflowed or is "
                      "broken; try float32 or bfloat16", UserWarning, 3)
    return report


def _encode_chunk(emb: Any, lines: list[str], start: int, options: EmbedOptions, bar: Any,
                  report: EmbedReport) -> np.ndarray:
    """One ``encode`` call; its warnings (which number the chunk's inputs) become the report's line numbers."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = emb.encode(lines, batch_size=options.batch_size, max_tokens=options.max_tokens,
                             normalize_embeddings=options.normalize, show_progress_bar=bar if bar is not None else False)
        except TpsurgeryError as exc:  # it names an index in this chunk: name the input line instead
            if exc.index is None or not 0 <= exc.index < len(lines):
                raise
            raise renumbered(exc, start + exc.index, f"--input line {start + exc.index + 1}: ") from exc.__cause__
    for w in caught:
        text = str(w.message)
        if "truncated to the model's limit" in text:
            cut = {i for t in emb.recipe.templates for i, r in enumerate(emb.tokenize(lines, t, warn=False))
                   if r.truncated}
            report.truncated.extend(start + i + 1 for i in sorted(cut))
        elif "are not finite" not in text:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    flat = out.reshape(len(out), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(1) | ((flat == 0).all(1) if flat.shape[1] else False))
    report.non_finite.extend(start + int(i) + 1 for i in bad)
    return out
