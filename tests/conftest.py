"""Shared fixtures: random-weight checkpoints, written once per session.

The checkpoints are shared between tests; treat them as read-only and copy one
(`shutil.copytree`) before damaging it.
"""

from __future__ import annotations

import os

# The oracle loads local folders only; never let it wait on an unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Test clusters are single-machine and on loopback: without this Ray rewrites 127.0.0.1
# into the host's interface address when a driver connects (read when ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import asyncio
import threading
from pathlib import Path

import pytest
import torch

from mixtral.config import ModelConfig, preset
from mixtral.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(cfg, shards=1, seed=0, dtype=torch.float32) -> Path, cached per session."""
    cache: dict[tuple, Path] = {}

    def make(cfg: ModelConfig, shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
        key = (cfg, shards, seed, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-s{shards}-seed{seed}")
            cache[key] = write_random_checkpoint(cfg, out, shards=shards, seed=seed, dtype=dtype)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_ckpt) -> Path:
    """The "tiny" preset (vocab 32000, v1 tokenizer), single file, seed 0."""
    return make_ckpt(preset("tiny"))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: shard processes share this machine's cores (an attention
    side spinning two threads starves them), and sums then run in the shards' order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loop():
    """An event loop in a thread, for servers (as in production, the engine loop lives there)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop

    async def cancel_the_rest():
        # What the module's servers left running (an idle engine loop) is cancelled and awaited,
        # rather than destroyed pending whenever the loop is collected.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(cancel_the_rest(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    if not thread.is_alive():
        loop.close()
