"""Data parallelism over processes (issue 16): the torchrun environment, shards, and a real two-process gloo group.

The processes are real (``torch.multiprocessing`` spawn, gloo on the CPU, the environment torchrun would set); the
model is a tiny random decoder. ``torchrun -m tpsurgery embed`` itself is tested in test_scale_cli.py.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpsurgery.distributed import World, shard_range, world_from_env
from tpsurgery.errors import LaunchError

RECIPE = "prompt: 'This sentence : <PST> \"{text}\" means'\ntp: {start: 1, stop: 3}\nexit_layer: 3"
TEXTS = ["a b", "c d e", "hello world", "x", "a b", "the end of it", "q"]


@given(st.integers(0, 200), st.integers(1, 9))
def test_shards_partition_the_input_in_order(n, size):
    shards = [shard_range(n, World(r, size)) for r in range(size)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("env, match", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is outside 0\.\.1"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
])
def test_inconsistent_torchrun_environment_is_a_launch_error(env, match):
    with pytest.raises(LaunchError, match=match):
        world_from_env(env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, out: str) -> None:
    """One rank: the environment torchrun sets, a gloo group, a sharded encode; then an error inside the group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import tpsurgery
    from tpsurgery.distributed import ShardedEncoder, process_group
    from tpsurgery.testing import tiny_model

    torch.set_num_threads(1)
    model, tok = tiny_model("llama", n_layers=4)
    world = world_from_env()
    with process_group(world, timeout_s=120), tpsurgery.apply(model, RECIPE, tokenizer=tok) as emb:
        got = ShardedEncoder(emb, world).encode(TEXTS, batch_size=2)
        assert ShardedEncoder(emb, world).recipe is emb.recipe  # the embedder's attributes pass through
    assert not dist.is_initialized()
    try:
        with process_group(world, timeout_s=120):
            raise KeyError("boom")
    except KeyError:
        pass
    np.save(f"{out}.{rank}.npy", np.stack([got, np.full_like(got, float(dist.is_initialized()))]))


def test_two_gloo_processes_encode_like_one(tmp_path):
    import torch.multiprocessing as mp

    import tpsurgery
    from tpsurgery.testing import tiny_model

    model, tok = tiny_model("llama", n_layers=4)
    with tpsurgery.apply(model, RECIPE, tokenizer=tok) as emb:
        want = emb.encode(TEXTS, batch_size=2)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        got, initialized = np.load(tmp_path / f"out.{rank}.npy")
        assert np.allclose(got, want, atol=1e-6, rtol=0)  # every rank gets all rows, in input order
        assert not initialized.any()  # the group was destroyed, also after an error inside it
