"""Failures of expert shards, injected into real processes (no Ray): a hung replica, every
replica of a group hung, the only replica killed and replaced. Requests either survive
with the tokens they would have had, or end as "unavailable" (503) after a bounded wait."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.errors import Unavailable
from attention_service.grpc_transport import GrpcTransport
from attention_service.loader import open_engine
from attention_service.sampling_params import SamplingParams
from cluster.api.backend import LocalBackend, open_stream
from cluster.api.limits import RequestLimits
from cluster.local import build_engine
from expert_service.launcher import start_shards, stop_shards
from mixtral.checkpoint import Checkpoint
from router.dispatch import Placement

GROUPS = [[0, 2, 4, 6], [1, 3, 5, 7]]
PROMPTS = [[1] + list(range(300 + 11 * i, 306 + 13 * i)) for i in range(3)]
N = 24
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")     # the shards share this machine's cores


@pytest.fixture(scope="module")
def shards(tiny_ckpt):
    """Group 0 once, group 1 twice: [g0, g1a, g1b]."""
    procs = start_shards(tiny_ckpt, [GROUPS[0], GROUPS[1], GROUPS[1]])
    yield procs
    for p in procs:
        if p.process.poll() is None:
            os.kill(p.process.pid, signal.SIGCONT)
    stop_shards(procs, timeout=10)


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt, groups=2)
    return [s.output_ids for s in asyncio.run(engine.generate(PROMPTS, GREEDY))]


def _engine(ckpt_dir, groups: list[list[str]], timeout: float, expert_wait_s: float,
            retry_after: float = 1.0) -> AsyncEngine:
    ckpt = Checkpoint(ckpt_dir)
    mc = ckpt.config
    placement = Placement.by_expert(GROUPS, mc.num_hidden_layers, mc.num_local_experts)
    transport = GrpcTransport(groups, timeout=timeout, retry_after=retry_after, min_rows_per_replica=1)
    engine, tok = open_engine(ckpt, EngineConfig(), transport, placement)
    return AsyncEngine(engine, tok, expert_wait_s=expert_wait_s)


async def _collect(ae: AsyncEngine, prompt: list[int], started: asyncio.Event | None = None):
    ids, last = [], None
    async for d in ae.generate(prompt, GREEDY):
        ids += d.token_ids
        last = d
        if started is not None and ids:
            started.set()
    return ids, last


def _signal(proc, sig) -> None:
    os.kill(proc.process.pid, sig)


def test_a_hung_replica_costs_one_timeout_and_no_request(tiny_ckpt, shards, expected):
    g0, g1a, g1b = shards

    async def run():
        ae = _engine(tiny_ckpt, [[g0.address], [g1a.address, g1b.address]], timeout=1.5, expert_wait_s=30)
        started = asyncio.Event()
        tasks = [asyncio.ensure_future(_collect(ae, p, started)) for p in PROMPTS]
        await started.wait()
        _signal(g1b, signal.SIGSTOP)                 # alive but silent: only a deadline finds it out
        try:
            out = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            _signal(g1b, signal.SIGCONT)
        failovers = ae.engine.transport.stats.failovers
        await ae.close()
        return out, failovers
    out, failovers = asyncio.run(run())
    assert [ids for ids, _ in out] == expected and all(last.finish_reason == "length" for _, last in out)
    assert failovers >= 1


def test_a_group_with_every_replica_hung_fails_its_requests_as_unavailable_after_the_wait(tiny_ckpt, shards):
    g0, g1a, g1b = shards

    async def run():
        ae = _engine(tiny_ckpt, [[g0.address], [g1a.address, g1b.address]], timeout=1.0, expert_wait_s=2.0,
                     retry_after=5.0)
        backend = LocalBackend(ae, "tiny", RequestLimits(retry_after_s=2.0))
        started = asyncio.Event()
        mid_stream = asyncio.ensure_future(_collect(ae, PROMPTS[0], started))
        await started.wait()
        _signal(g1a, signal.SIGSTOP)
        _signal(g1b, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as refused:           # before its first token: 503
                await open_stream(backend, PROMPTS[1], GREEDY)
            waited = time.monotonic() - t0
            ready_while_down = (await backend.ready())[0]
            ids, last = await asyncio.wait_for(mid_stream, 60)
        finally:
            _signal(g1a, signal.SIGCONT)
            _signal(g1b, signal.SIGCONT)
        # The replicas are back: the same engine serves again.
        after, _ = await _collect(ae, PROMPTS[2])
        await ae.close()
        return refused.value, waited, ready_while_down, (ids, last), after
    refused, waited, ready_while_down, (ids, last), after = asyncio.run(run())
    assert "expert group 1" in refused.message and refused.retry_after_s == 2.0
    assert 2.0 <= waited < 15
    assert not ready_while_down
    assert last.finish_reason == "error" and last.error_code == "unavailable" and 0 < len(ids) < N
    assert len(after) == N


def test_the_only_replica_killed_and_replaced_loses_no_request(tiny_ckpt, shards, expected, caplog):
    """What the directory does in the app (drop the dead address, add the new one), by hand."""
    g0, g1a, g1b = shards
    g1b.kill()                                       # group 1 down to one replica, then none

    async def run():
        ae = _engine(tiny_ckpt, [[g0.address], [g1a.address]], timeout=5.0, expert_wait_s=120)
        transport = ae.engine.transport
        started = asyncio.Event()
        tasks = [asyncio.ensure_future(_collect(ae, p, started)) for p in PROMPTS]
        await started.wait()
        g1a.kill()
        transport.set_replicas(1, [])                # the directory forgets it within its lease
        (new,) = await asyncio.to_thread(start_shards, tiny_ckpt, [GROUPS[1]])
        transport.set_replicas(1, [new.address])     # ... and lists the replacement once it registers
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            await ae.close()
            new.stop(10)
    out = asyncio.run(run())
    assert [ids for ids, _ in out] == expected and all(last.finish_reason == "length" for _, last in out)
    assert "expert group 1 has no replica; requests wait" in caplog.text      # they did wait
