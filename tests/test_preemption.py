"""Preemption on a real model: a KV cache too small for the batch sends sequences back to
wait, they are recomputed, and every token is still transformers' (greedy) or the
unpressured run's (seeded), in-process and with the experts over gRPC; every block comes back.
(The served app's case is in tests/test_prefix_routing.py, which already runs an app.)"""

import asyncio

import msgspec
import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.loader import connect_engine
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from expert_service.launcher import start_shards, stop_shards
from router.dispatch import split_experts

N = 24
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=N, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
# The tiny model's KV per token: K and V, 2 layers, 2 KV heads of 16 dims, fp32.
PER_TOKEN = 2 * 2 * 2 * 16 * 4
# 40 blocks of 4 tokens: any one request fits (the longest needs 84 positions), the batch (~330) does not.
TIGHT = EngineConfig(block_size=4, kv_cache_bytes=40 * 4 * PER_TOKEN, max_batched_tokens=64)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(21)
    return [[1] + torch.randint(3, 32000, (n,), generator=g).tolist() for n in (60, 5, 33, 17, 48, 9)]


@pytest.fixture(scope="module")
def transformers_tokens(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    out = []
    for p in _prompts():
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=N, min_new_tokens=N, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def unpressured_seeded(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt, EngineConfig(block_size=4))
    seqs = asyncio.run(engine.generate(_prompts(), SEEDED))
    assert engine.num_preemptions == 0
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["recompute", "cached-blocks"])
def test_greedy_tokens_survive_preemption_in_process(tiny_ckpt, transformers_tokens, prefix_caching):
    engine, _ = build_engine(tiny_ckpt, msgspec.structs.replace(TIGHT, prefix_caching=prefix_caching))
    seqs = asyncio.run(engine.generate(_prompts(), GREEDY))
    assert engine.num_preemptions >= 2
    assert [s.output_ids for s in seqs] == transformers_tokens
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.blocks_all_free


def test_seeded_samples_survive_preemption_in_process(tiny_ckpt, unpressured_seeded):
    engine, _ = build_engine(tiny_ckpt, TIGHT)
    seqs = asyncio.run(engine.generate(_prompts(), SEEDED))
    assert engine.num_preemptions >= 2
    assert [s.output_ids for s in seqs] == unpressured_seeded
    assert engine.blocks_all_free


def test_preemption_with_experts_over_grpc(tiny_ckpt, transformers_tokens, unpressured_seeded, one_thread):
    shards = start_shards(tiny_ckpt, split_experts(8, 2))

    async def run(params):
        engine, _ = await connect_engine(tiny_ckpt, [s.address for s in shards], TIGHT)
        try:
            seqs = await engine.generate(_prompts(), params)
            return [s.output_ids for s in seqs], engine.num_preemptions, engine.blocks_all_free
        finally:
            await engine.close()
    try:
        greedy, greedy_preempted, greedy_freed = asyncio.run(run(GREEDY))
        seeded, seeded_preempted, seeded_freed = asyncio.run(run(SEEDED))
    finally:
        stop_shards(shards)
    assert greedy == transformers_tokens and greedy_preempted >= 2 and greedy_freed
    assert seeded == unpressured_seeded and seeded_preempted >= 2 and seeded_freed
