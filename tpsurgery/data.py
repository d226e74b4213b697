"""Loaders for the SentEval data layout: STS12-16, STS-B, SICK-R and the transfer tasks, parsed as SentEval does.

Files are looked up in one or more data folders (the first folder that holds a file wins), so a full SentEval copy and
a folder of extra files can be combined. Sentences are SentEval-tokenized: whitespace-split and joined by one space.

>>> pairs = load_sts_year(["../shared/data/format-samples"], "sts15")
>>> len(pairs), pairs.gold.dtype.name      # 60 lines, 32 with an empty gold line (skipped)
(28, 'float64')
>>> dev = load_stsb(["../shared/data/senteval"], "dev", limit=2)
>>> dev.a[0], dev.b[0], float(dev.gold[0])
('a man with a hard hat is dancing .', 'a man wearing a hard hat is dancing .', 5.0)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import TpsurgeryError

DataDirs = Sequence[str | os.PathLike]

STS_YEARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sts12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "sts13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),
    "sts14": ("STS14-en-test", ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news")),
    "sts15": ("STS15-en-test", ("answers-forums", "answers-students", "belief", "headlines", "images")),
    "sts16": ("STS16-en-test", ("answer-answer", "headlines", "plagiarism", "postediting", "question-question")),
}
BINARY_FILES = {  # task -> (folder, file of label 1, file of label 0), as SentEval's BinaryClassifierEval
    "mr": ("MR", "rt-polarity.pos", "rt-polarity.neg"),
    "cr": ("CR", "custrev.pos", "custrev.neg"),
    "subj": ("SUBJ", "subj.objective", "subj.subjective"),
    "mpqa": ("MPQA", "mpqa.pos", "mpqa.neg"),
}
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


class DataError(TpsurgeryError):
    """A data file is missing or does not have the expected format (the message names the file and line)."""


class DataNotFound(DataError):
    """No data folder holds the file (the message lists the folders searched)."""


def tokens(text: str) -> str:
    """SentEval tokenization as its batchers see it: whitespace-split, joined by single spaces.

    >>> tokens(" the rock is destined . ")
    'the rock is destined .'
    """
    return " ".join(text.split())


@dataclass(frozen=True)
class PairSet:
    """Scored sentence pairs of one STS task: ``a[i]``, ``b[i]`` with gold score ``gold[i]``; ``subset[i]`` names the file."""

    name: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    gold: np.ndarray
    subset: tuple[str, ...]
    files: tuple[Path, ...]
    origin: str = ""  # where the pairs came from when not from files (a hub dataset, revision and split)

    def __len__(self) -> int:
        return len(self.a)


@dataclass(frozen=True)
class Split:
    """Labelled texts of one split (``b`` holds the second sentences of pair tasks such as MRPC, else None)."""

    a: tuple[str, ...]
    y: np.ndarray
    b: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.a)

    def texts(self) -> list[str]:
        return list(self.a) + list(self.b or ())


@dataclass(frozen=True)
class ClassificationSet:
    """A transfer task: splits ``all`` (cross-validated), ``train``+``test`` or ``train``+``dev``+``test``."""

    name: str
    splits: dict[str, Split]
    n_classes: int
    files: tuple[Path, ...] = field(default=())

    @property
    def paired(self) -> bool:
        return next(iter(self.splits.values())).b is not None


def find_file(data_dirs: DataDirs, relpath: str) -> Path:
    """The first ``<dir>/<relpath>`` that exists; the error lists the folders searched."""
    if isinstance(data_dirs, (str, os.PathLike)):
        data_dirs = [data_dirs]
    for d in data_dirs:
        p = Path(d).expanduser() / relpath
        if p.is_file():
            return p
    where = ", ".join(str(d) for d in data_dirs) or "(no --data-dir given)"
    raise DataNotFound(f"data file {relpath} not found under {where} (SentEval layout expected; see docs/evaluation.md)")


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines without line endings (``\\r\\n`` too), as SentEval's ``read().splitlines()``."""
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not {encoding} text ({exc})") from None


def _fields(path: Path, lineno: int, line: str, n: int) -> list[str]:
    parts = line.strip("\r\n").split("\t")
    if len(parts) < n:
        raise DataError(f"{path}:{lineno}: expected at least {n} tab-separated fields, got {len(parts)}")
    return parts


def _float(path: Path, lineno: int, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}:{lineno}: gold score {text!r} is not a number") from None


def _limited(a, b, gold, subset, limit):
    if limit is not None:
        a, b, gold, subset = a[:limit], b[:limit], gold[:limit], subset[:limit]
    return tuple(a), tuple(b), np.asarray(gold, dtype=np.float64), tuple(subset)


def load_sts_year(data_dirs: DataDirs, task: str, limit: int | None = None) -> PairSet:
    """STS12-16: every sub-set of the year in the order SentEval lists them; pairs with an empty gold line skipped."""
    folder, subsets = STS_YEARS[task]
    a, b, gold, sub, files = [], [], [], [], []
    for s in subsets:
        inp = find_file(data_dirs, f"STS/{folder}/STS.input.{s}.txt")
        gs = find_file(data_dirs, f"STS/{folder}/STS.gs.{s}.txt")
        files += [inp, gs]
        lines, scores = read_lines(inp), read_lines(gs)
        if len(lines) != len(scores):
            raise DataError(f"{inp} has {len(lines)} lines but {gs} has {len(scores)}")
        for i, (line, score) in enumerate(zip(lines, scores), 1):
            if score.strip() == "":
                continue
            parts = _fields(inp, i, line, 2)
            a.append(tokens(parts[0]))
            b.append(tokens(parts[1]))
            gold.append(_float(gs, i, score.strip()))
            sub.append(s)
    return PairSet(task, *_limited(a, b, gold, sub, limit), files=tuple(files))


def load_stsb(data_dirs: DataDirs, split: str = "test", limit: int | None = None) -> PairSet:
    """STS Benchmark ``sts-{train,dev,test}.csv`` (tab-separated; score in field 5, sentences in fields 6 and 7).

    ``subset`` is genre/source, e.g. ``main-captions/MSRvid`` (fields 1 and 2).
    """
    path = find_file(data_dirs, f"STS/STSBenchmark/sts-{split}.csv")
    a, b, gold, source = [], [], [], []
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        parts = _fields(path, i, line, 7)
        gold.append(_float(path, i, parts[4]))
        a.append(tokens(parts[5]))
        b.append(tokens(parts[6]))
        source.append(f"{parts[0]}/{parts[1]}")
    return PairSet(f"stsb-{split}", *_limited(a, b, gold, source, limit), files=(path,))


def load_sick(data_dirs: DataDirs, split: str = "test", limit: int | None = None) -> PairSet:
    """SICK relatedness ``SICK_{train,trial,test_annotated}.txt`` (header line; sentences in fields 2-3, score 4)."""
    name = {"test": "SICK_test_annotated.txt", "train": "SICK_train.txt", "trial": "SICK_trial.txt"}[split]
    path = find_file(data_dirs, f"SICK/{name}")
    a, b, gold = [], [], []
    for i, line in enumerate(read_lines(path)[1:], 2):
        if not line.strip():
            continue
        parts = _fields(path, i, line, 4)
        a.append(tokens(parts[1]))
        b.append(tokens(parts[2]))
        gold.append(_float(path, i, parts[3]))
    return PairSet(f"sick-{split}", *_limited(a, b, gold, [split] * len(a), limit), files=(path,))


def load_binary(data_dirs: DataDirs, task: str, limit: int | None = None) -> ClassificationSet:
    """MR, CR, SUBJ, MPQA: one sentence per line (latin-1, as SentEval reads them); ``limit`` lines per class."""
    folder, pos_name, neg_name = BINARY_FILES[task]
    pos, neg = find_file(data_dirs, f"{folder}/{pos_name}"), find_file(data_dirs, f"{folder}/{neg_name}")
    p = [tokens(t) for t in read_lines(pos, "latin-1")][:limit]
    n = [tokens(t) for t in read_lines(neg, "latin-1")][:limit]
    y = np.array([1] * len(p) + [0] * len(n))
    return ClassificationSet(task, {"all": Split(tuple(p + n), y)}, 2, (pos, neg))


def load_sst2(data_dirs: DataDirs, limit: int | None = None) -> ClassificationSet:
    """SST-2 ``SST/binary/sentiment-{train,dev,test}``: ``sentence<TAB>label`` per line (utf-8)."""
    splits, files = {}, []
    for split in ("train", "dev", "test"):
        path = find_file(data_dirs, f"SST/binary/sentiment-{split}")
        files.append(path)
        texts, labels = [], []
        for i, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            parts = _fields(path, i, line, 2)
            texts.append(tokens(parts[0]))
            labels.append(_label(path, i, parts[1]))
        splits[split] = Split(tuple(texts[:limit]), np.array(labels[:limit]))
    return ClassificationSet("sst2", splits, 2, tuple(files))


def _label(path: Path, lineno: int, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DataError(f"{path}:{lineno}: label {text!r} is not an integer") from None


def load_trec(data_dirs: DataDirs, limit: int | None = None) -> ClassificationSet:
    """TREC ``train_5500.label`` / ``TREC_10.label``: ``COARSE:fine question`` per line (latin-1); 6 coarse classes."""
    splits, files = {}, []
    for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
        path = find_file(data_dirs, f"TREC/{name}")
        files.append(path)
        texts, labels = [], []
        for i, line in enumerate(read_lines(path, "latin-1"), 1):
            if not line.strip():
                continue
            coarse, _, rest = line.strip().partition(":")
            if coarse not in TREC_CLASSES or " " not in rest:
                raise DataError(f"{path}:{i}: expected 'COARSE:fine question' with COARSE in {', '.join(TREC_CLASSES)}")
            texts.append(tokens(rest.split(" ", 1)[1]))
            labels.append(TREC_CLASSES.index(coarse))
        splits[split] = Split(tuple(texts[:limit]), np.array(labels[:limit]))
    return ClassificationSet("trec", splits, len(TREC_CLASSES), tuple(files))


def load_mrpc(data_dirs: DataDirs, limit: int | None = None) -> ClassificationSet:
    """MRPC ``msr_paraphrase_{train,test}.txt``: header, then ``label<TAB>id<TAB>id<TAB>s1<TAB>s2`` (utf-8)."""
    splits, files = {}, []
    for split in ("train", "test"):
        path = find_file(data_dirs, f"MRPC/msr_paraphrase_{split}.txt")
        files.append(path)
        a, b, labels = [], [], []
        for i, line in enumerate(read_lines(path, "utf-8-sig")[1:], 2):
            if not line.strip():
                continue
            parts = _fields(path, i, line, 5)
            labels.append(_label(path, i, parts[0]))
            a.append(tokens(parts[3]))
            b.append(tokens(parts[4]))
        splits[split] = Split(tuple(a[:limit]), np.array(labels[:limit]), tuple(b[:limit]))
    return ClassificationSet("mrpc", splits, 2, tuple(files))


def _spread_index(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, k).round().astype(int)) if k < n else np.arange(n)


SPREAD_MODES = ("order", "gold")


def _by_value(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` items at evenly spaced quantiles of ``values`` (stable sort: ties keep file order), returned
    in file order."""
    order = np.argsort(values, kind="stable")
    return np.sort(order[_spread_index(len(values), k)])


def spread(data: PairSet | ClassificationSet, k: int, by: str = "order") -> PairSet | ClassificationSet:
    """``k`` evenly spaced items (per split).

    ``by="order"``: evenly spaced in file order, so every sub-set / genre / class of a file is represented.
    ``by="gold"``: evenly spaced quantiles of the gold score (labels for transfer tasks): the items sorted by gold
    score (ties in file order), then every ``(n - 1) / (k - 1)``-th one, rounded, kept in file order; the gold-score
    distribution of the subset follows the file's, whatever the file's order. Both are deterministic.

    >>> dev = load_stsb(["../shared/data/senteval"], "dev")
    >>> small = spread(dev, 200)
    >>> len(small), len(set(small.subset)), small.a[0] == dev.a[0]    # all 6 genre/source sub-sets of STS-B dev
    (200, 6, True)
    >>> by_gold = spread(dev, 200, by="gold")
    >>> len(by_gold), float(by_gold.gold.min()) == float(dev.gold.min()), float(by_gold.gold.max()) == float(dev.gold.max())
    (200, True, True)
    """
    if not isinstance(k, int) or k < 1:
        raise DataError(f"spread: the number of items must be a positive integer, got {k!r}")
    if by not in SPREAD_MODES:
        raise DataError(f"spread: unknown mode {by!r}; choose from {', '.join(SPREAD_MODES)}")
    if isinstance(data, PairSet):
        i = _spread_index(len(data), k) if by == "order" else _by_value(data.gold, k)
        return PairSet(data.name, tuple(data.a[j] for j in i), tuple(data.b[j] for j in i), data.gold[i],
                       tuple(data.subset[j] for j in i), data.files, data.origin)
    splits = {}
    for name, sp in data.splits.items():
        i = _spread_index(len(sp), k) if by == "order" else _by_value(sp.y, k)
        splits[name] = Split(tuple(sp.a[j] for j in i), sp.y[i], None if sp.b is None else tuple(sp.b[j] for j in i))
    return ClassificationSet(data.name, splits, data.n_classes, data.files)


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), for results JSON provenance.

    >>> file_hash(Path("../shared/data/format-samples/TREC/TREC_10.label"))[:4]
    'b3fc'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
