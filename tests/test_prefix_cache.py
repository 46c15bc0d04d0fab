"""Prefix caching on a real model: requests sharing a prefix reuse its KV blocks and give
the tokens they give without the cache, and transformers' tokens."""

import asyncio

import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)


def _shared_prompts(n: int, system: int, seed: int = 0) -> list[list[int]]:
    """n prompts: one `system`-token prefix, then a distinct tail of 5 to 40 tokens each."""
    g = torch.Generator().manual_seed(seed)
    head = [1] + torch.randint(3, 32000, (system - 1,), generator=g).tolist()
    return [head + torch.randint(3, 32000, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _run(engine, prompts, params, one_by_one: bool):
    if one_by_one:                      # each after the last finished: later ones hit the cache
        return [asyncio.run(engine.generate([p], params))[0].output_ids for p in prompts]
    return [s.output_ids for s in asyncio.run(engine.generate(prompts, params))]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_cache_hits_change_no_token(tiny_ckpt, params):
    prompts = _shared_prompts(6, system=100)
    cold, _ = build_engine(tiny_ckpt, EngineConfig(block_size=8, prefix_caching=False))
    warm, _ = build_engine(tiny_ckpt, EngineConfig(block_size=8))
    want = _run(cold, prompts, params, one_by_one=True)
    got = _run(warm, prompts, params, one_by_one=True)
    assert got == want
    st = warm.prefix_stats
    assert st.hit_tokens == 5 * 96                          # 12 full blocks of the prefix, for each later prompt
    assert cold.prefix_stats.hit_tokens == 0
    assert warm.blocks_all_free


def test_cache_hits_match_transformers(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    prompts = _shared_prompts(3, system=70, seed=3)
    warm, _ = build_engine(tiny_ckpt, EngineConfig(block_size=16))
    got = _run(warm, prompts, GREEDY, one_by_one=True)
    assert warm.prefix_stats.hit_blocks == 2 * 4
    for p, ids in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(p):].tolist()
        assert ids == ref


def test_preempted_requests_restart_from_their_cached_blocks(tiny_ckpt):
    """A cache too small for the batch: sequences are preempted and come back on what of their
    blocks is still cached; every output equals the unpressured run's."""
    prompts = _shared_prompts(8, system=40, seed=5)
    roomy, _ = build_engine(tiny_ckpt, EngineConfig(block_size=4, prefix_caching=False))
    want = _run(roomy, prompts, SEEDED, one_by_one=False)
    per_token = 2 * 2 * 2 * 16 * 4                             # K and V, 2 layers, 2 kv heads, 16 dims, fp32
    tight, _ = build_engine(tiny_ckpt, EngineConfig(block_size=4, kv_cache_bytes=40 * 4 * per_token,
                                                   max_batched_tokens=64))
    got = _run(tight, prompts, SEEDED, one_by_one=False)
    assert tight.num_preemptions > 0 and tight.prefix_stats.hit_blocks > 0
    assert got == want
    assert tight.blocks_all_free
