"""Data parallelism over processes with torch.distributed: ``torchrun --nproc-per-node=N -m tpsurgery embed ...``.

Each process (rank) embeds one contiguous shard of the input and writes it to a part file; rank 0 merges the parts in
input order into the output, atomically. Data moves through files, never through the process group: memory stays
bounded by one chunk whatever the corpus, and a restarted run finds the parts its ranks already finished. The group
(gloo) only synchronizes ranks and gathers small objects (``eval``'s embeddings), so it needs no GPU binding; each
rank's model may still live on its own GPU (``cuda:LOCAL_RANK``, see :func:`rank_device`).

>>> world_from_env({})
World(rank=0, size=1, local_rank=0)
>>> world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).main
False
>>> [shard_range(10, World(r, 3)) for r in range(3)]
[range(0, 3), range(3, 6), range(6, 10)]
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .errors import LaunchError


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that merges, writes results and prints."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process when unset)."""
    env = os.environ if env is None else env

    def read(name: str, default: int) -> int:
        raw = env.get(name, "")
        if raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise LaunchError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None

    size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    if size < 1:
        raise LaunchError(f"WORLD_SIZE={size}: a run needs at least one process")
    if not 0 <= rank < size:
        raise LaunchError(f"RANK={rank} is outside 0..{size - 1} (WORLD_SIZE={size})")
    return World(rank, size, read("LOCAL_RANK", rank))


def shard_range(n: int, world: World) -> range:
    """Rank ``r``'s lines: ``[r * n // size, (r + 1) * n // size)``.

    Contiguous shards whose sizes differ by at most one; concatenated in rank order they are the input in order, so
    merging is a copy. Every rank computes the same split from ``n`` alone (no communication).
    """
    return range(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def rank_device(device: str | None, world: World) -> str | None:
    """The device a rank loads its model on: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process).

    >>> rank_device("cuda", World(1, 2, 1)), rank_device("cuda:3", World(1, 2, 1)), rank_device(None, World(1, 2, 1))
    ('cuda:1', 'cuda:3', None)
    """
    if device == "cuda" and world.size > 1:
        return f"cuda:{world.local_rank}"
    return device


@contextlib.contextmanager
def process_group(world: World, backend: str = "gloo", timeout_s: float = 3600.0) -> Iterator[World]:
    """torch.distributed's default process group for a multi-process world; destroyed on exit, also on errors.

    One process: nothing to set up. A group someone else initialized is used and left alone. On a normal exit the ranks
    meet at a barrier before the group goes; after an error it goes at once (torchrun stops the other ranks).
    ``timeout_s`` bounds how long a rank waits for the others at a barrier (the slowest shard must finish within it).
    """
    if world.size == 1:
        yield world
        return
    import torch.distributed as dist

    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield world
        if ours:  # leave together: a rank that tears down early can strand the others' last collective
            dist.barrier()
    finally:
        if ours:
            dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every rank got here (nothing to wait for in one process)."""
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_rows(rows: np.ndarray, world: World) -> np.ndarray:
    """Every rank's ``rows`` concatenated in rank order, on every rank (for ``eval``: a few thousand sentences)."""
    if world.size == 1:
        return rows
    import torch.distributed as dist

    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, np.ascontiguousarray(rows))
    return np.concatenate(parts)


class ShardedEncoder:
    """An encoder that embeds only this rank's share of each ``encode`` call and returns every rank's rows.

    Wraps an :class:`~tpsurgery.Embedder` for ``eval`` under torchrun: each rank embeds a contiguous shard, the
    shards are gathered in order, and every rank gets the whole array (the scoring after it is cheap). Attributes
    other than ``encode`` are the embedder's.
    """

    def __init__(self, encoder: Any, world: World):
        self.encoder = encoder
        self.world = world

    def encode(self, sentences: Sequence[str], **kwargs: Any) -> np.ndarray:
        texts = list(sentences)
        share = shard_range(len(texts), self.world)
        mine = np.asarray(self.encoder.encode(texts[share.start: share.stop], **kwargs), dtype=np.float32)
        return gather_rows(mine, self.world)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)


# -- embed: one part file per rank, merged by rank 0 ---------------------------------------------------------------
def parts_dir(output: Path) -> Path:
    """The folder beside ``output`` where ranks leave their parts (removed after the merge)."""
    return output.parent / f".{output.name}.parts"


def part_path(output: Path, world: World, key: str) -> Path:
    """Rank ``world.rank``'s finished part. ``key`` names the run (input file, recipe, model, ...): a restarted run
    reuses only parts of the same run."""
    return parts_dir(output) / f"rank{world.rank:05d}-of-{world.size:05d}.{key}.npy"


def merge_parts(output: Path, parts: Sequence[Path], chunk_rows: int = 65536) -> tuple[int, int]:
    """Concatenate the ``.npy`` parts in order into ``output`` (float32 ``[n, d]``), atomically; returns ``(n, d)``.

    Parts are memory-mapped and copied ``chunk_rows`` rows at a time into the temporary file of a
    :class:`~tpsurgery.textio.NpyWriter`, renamed into place at the end: memory stays bounded, and an interrupt never
    leaves half an output.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for k, rows in enumerate([[[1., 2.]], [[3., 4.], [5., 6.]], np.zeros((0, 2))]):
    ...     np.save(folder / f"p{k}.npy", np.asarray(rows, np.float32))
    >>> merge_parts(folder / "out.npy", [folder / f"p{k}.npy" for k in range(3)], chunk_rows=1)
    (3, 2)
    >>> np.load(folder / "out.npy").tolist()
    [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    """
    from .textio import NpyWriter

    arrays = [np.load(p, mmap_mode="r") for p in parts]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1 or any(a.ndim != 2 for a in arrays):
        raise LaunchError(f"part files disagree on the embedding shape ({sorted(map(str, shapes))}): "
                          f"{', '.join(map(str, parts))}")
    n, d = sum(len(a) for a in arrays), arrays[0].shape[1]
    with NpyWriter(output, (n, d)) as out:
        at = 0
        for a in arrays:
            for k in range(0, len(a), chunk_rows):
                out.write(at + k, a[k: k + chunk_rows])
            at += len(a)
        out.commit()
    return n, d


def embed_shards(emb: Any, input: Path, output: Path, options: Any, world: World, key: str, reuse: bool = True) -> Any:
    """This rank's shard of ``input``'s lines embedded into its part file, then (rank 0) the parts merged into
    ``output`` in input order. A part that a killed run already finished is reused (same ``key``, and ``reuse``);
    unfinished ones resume from the embedding cache. Returns this rank's :class:`~tpsurgery.embed_file.EmbedReport`
    (``reused`` when the part was an earlier run's, ``cached``: texts the embedding cache held)."""
    import dataclasses

    from .embed_file import EmbedReport, embed_file
    from .textio import count_lines

    share = shard_range(count_lines(input), world)
    part = part_path(output, world, key)
    if part.exists() and reuse:
        report = EmbedReport(rows=len(share), dim=int(np.load(part, mmap_mode="r").shape[1]), reused=True)
    else:
        opts = dataclasses.replace(options, label=f"embed rank {world.rank}/{world.size}", bar_row=world.rank)
        report = embed_file(emb, input, part, opts, lines=share)
    barrier(world)
    if world.main:
        merge_parts(output, [part_path(output, World(r, world.size), key) for r in range(world.size)])
        shutil.rmtree(parts_dir(output), ignore_errors=True)
    return report
