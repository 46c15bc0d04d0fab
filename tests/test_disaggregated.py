"""Experts in separate processes over real gRPC give exactly the in-process engine's tokens."""

import asyncio

import pytest

from attention_service.config import EngineConfig
from attention_service.loader import connect_engine
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from expert_service.launcher import start_shards, stop_shards
from router.dispatch import split_experts

PROMPTS = [[1] + list(range(500, 500 + n)) for n in (1, 9, 33, 120, 4, 60)]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")     # the shards share this machine's cores


@pytest.fixture(scope="module")
def shards(tiny_ckpt):
    """Every layout, started once for the module: name -> addresses."""
    # 3 groups: uneven ones (3, 3, 2 experts), a token's two experts in one group or in two.
    layouts = {f"{g} groups": split_experts(8, g) for g in (1, 2, 3)}
    started = {name: start_shards(tiny_ckpt, groups) for name, groups in layouts.items()}
    started["2 groups twice"] = start_shards(tiny_ckpt, split_experts(8, 2) * 2)      # two replicas of each
    # Groups holding experts of only some layers: all experts of layer 0 in one, of layer 1 in another.
    started["by layer"] = start_shards(tiny_ckpt, [list(range(8))], layers=[0]) + \
        start_shards(tiny_ckpt, [list(range(8))], layers=[1])
    yield {name: [s.address for s in procs] for name, procs in started.items()}
    stop_shards([s for procs in started.values() for s in procs])      # drained in parallel


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt)
    return [s.output_ids for s in asyncio.run(engine.generate(PROMPTS, GREEDY))]


async def _generate(model, addresses, micro_batches=1, prompts=PROMPTS, params=GREEDY):
    engine, _ = await connect_engine(model, addresses, EngineConfig(micro_batches=micro_batches))
    try:
        seqs = await engine.generate(prompts, params)
        return [s.output_ids for s in seqs], engine
    finally:
        await engine.runner.transport.close()


@pytest.mark.parametrize("layout,micro_batches", [
    ("1 groups", 1), ("2 groups", 1), ("2 groups", 2), ("2 groups", 3), ("3 groups", 1),
    ("3 groups", 3), ("by layer", 2)])
def test_same_tokens_as_in_process(tiny_ckpt, shards, expected, layout, micro_batches):
    got, engine = asyncio.run(_generate(tiny_ckpt, shards[layout], micro_batches))
    assert got == expected
    groups = len(shards[layout])
    assert engine.runner.placement.num_groups == groups
    stats = engine.runner.transport.stats
    assert stats.rpcs > 0 and stats.failovers == 0
    # A token goes once to each group that holds any of its experts: never more rows than K per token.
    tokens_through_layers = sum(len(p) + 15 for p in PROMPTS) * 2
    assert stats.rows <= tokens_through_layers * min(2, groups)


def test_kill_a_replica_mid_generation(tiny_ckpt):
    """Two replicas of each of two groups; one dies while requests run: same tokens, no error."""
    procs = start_shards(tiny_ckpt, split_experts(8, 2) * 2)
    try:
        async def run():
            engine, _ = await connect_engine(tiny_ckpt, [p.address for p in procs])
            seqs = [engine.add(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for p in PROMPTS]
            steps = 0
            while engine.scheduler.has_work:
                await engine.step()
                steps += 1
                if steps == 5:
                    procs[0].kill()
            await engine.runner.transport.close()
            return seqs, engine.runner.transport.stats

        seqs, stats = asyncio.run(run())
        engine, _ = build_engine(tiny_ckpt)
        ref = asyncio.run(engine.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)))
        assert [s.output_ids for s in seqs] == [r.output_ids for r in ref]
        assert stats.failovers >= 1
    finally:
        stop_shards(procs)


def test_replicas_of_a_group_share_its_rows(tiny_ckpt, shards):
    """Decode batches are too small to split, so whole batches rotate over a group's replicas."""
    addresses = shards["2 groups twice"]               # group 0, group 1, group 0, group 1

    async def run():
        engine, _ = await connect_engine(tiny_ckpt, addresses)
        await engine.generate([[1, 5 + i] for i in range(4)], SamplingParams(max_tokens=30, ignore_eos=True))
        await engine.runner.transport.close()
        return engine.runner.transport.stats.per_replica_rows

    rows = asyncio.run(run())
    for g in range(2):
        a, b = rows.get(addresses[g], 0), rows.get(addresses[g + 2], 0)
        assert min(a, b) >= 0.4 * max(a, b), f"group {g}: replica rows {a} vs {b}"


def test_group_with_no_live_replica_fails_clearly(tiny_ckpt):
    procs = start_shards(tiny_ckpt, split_experts(8, 2))

    async def run():
        engine, _ = await connect_engine(tiny_ckpt, [p.address for p in procs])
        procs[1].kill()
        procs[1].process.wait()
        try:
            with pytest.raises(RuntimeError, match="expert group 1 has no live replica"):
                await engine.generate([[1, 2, 3]], GREEDY)
        finally:
            await engine.runner.transport.close()

    try:
        asyncio.run(run())
    finally:
        stop_shards(procs)
