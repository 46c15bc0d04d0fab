"""Cache-aware routing across Attention replicas: the choice, and the served app with 2 replicas."""

import asyncio
import collections
import urllib.request

import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from cluster.observe.metrics_gather import parse, samples
from cluster.serve.prefix_router import choose, prefix_key, rendezvous
from cluster.tools.harness import running_app

KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4     # the tiny model: K and V, 2 layers, 2 KV heads of 16, fp32
SYSTEM = torch.randint(3, 32000, (80,), generator=torch.Generator().manual_seed(0)).tolist()


def test_prompts_opening_alike_share_a_key_and_others_do_not():
    a = prefix_key([1] + SYSTEM + [5, 6, 7], 16, 4)
    b = prefix_key([1] + SYSTEM + [9] * 40, 16, 4)
    other = prefix_key([1] + SYSTEM[::-1], 16, 4)
    assert a == b and a != other
    assert prefix_key(list(range(15)), 16, 4) == b""                       # under one block: no key
    assert prefix_key(list(range(40)), 16, 4) == prefix_key(list(range(40)) + [1] * 7, 16, 4)   # 2 full blocks


def test_rendezvous_moves_only_the_keys_of_a_replica_that_goes():
    keys = [prefix_key(list(range(i, i + 64)), 16, 4) for i in range(300)]
    three, two = ["r1", "r2", "r3"], ["r1", "r3"]
    before = {k: rendezvous(k, three)[0] for k in keys}
    after = {k: rendezvous(k, two)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r2" for k in moved) and all(after[k] == before[k] for k in keys if before[k] != "r2")
    spread = collections.Counter(before.values())
    assert min(spread.values()) > 60                                        # roughly a third each


def test_load_wins_past_the_imbalance_and_short_prompts_are_balanced():
    key = prefix_key(SYSTEM, 16, 4)
    best = rendezvous(key, ["a", "b"])[0]
    other = "b" if best == "a" else "a"
    assert choose(key, {best: 3, other: 0}, max_imbalance=8) == (best, "affinity")
    assert choose(key, {best: 8, other: 0}, max_imbalance=8) == (None, "balanced")
    assert choose(b"", {"a": 0, "b": 5}, 8) == (None, "balanced")
    assert choose(key, {"a": 0}, 8) == (None, "balanced")


def _metric(url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        fams = parse(r.read().decode())
    out: dict[str, float] = collections.defaultdict(float)
    for s in samples(fams, name):
        out[s.labels.get("process", "") + s.labels.get("decision", "")] += s.value
    return dict(out)


@pytest.mark.e2e
def test_two_attention_replicas_keep_a_prefix_on_one_and_preempt_exactly(tiny_ckpt):
    """Eight requests sharing an 80-token system prompt, then eight of another: each family is
    served by one replica, so the cache hit rate is what one replica alone would have. Then four
    longer requests of one family at once overflow that replica's KV cache (20 blocks of 16: 5
    shared, 5 more each): it preempts and recomputes, and the tokens are still the in-process
    engine's."""
    import openai

    families = [[1] + SYSTEM, [1] + SYSTEM[::-1]]
    config = {"model_name": "tiny", "groups": 1, "autoscaling": {"enabled": False},
              "attention": {"replicas": 2, "engine": {"block_size": 16, "max_model_len": 256,
                                                      "kv_cache_bytes": 20 * 16 * KV_BYTES_PER_TOKEN}}}
    long_prompts = [families[0] + [300 + i] * (i + 1) for i in range(4)]
    greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    engine, tok = build_engine(tiny_ckpt, EngineConfig(block_size=16))
    # The text the front door streams for these ids: decoded with the prompt's last tokens before it.
    expected = [tok.decode(p[-6:] + s.output_ids)[len(tok.decode(p[-6:])):]
                for p, s in zip(long_prompts, asyncio.run(engine.generate(long_prompts, greedy)))]
    with running_app(tiny_ckpt, **config) as (_, url, _):
        async def run():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            for head in families:
                for i in range(8):
                    await client.completions.create(model="tiny", prompt=head + [100 + i, 200 + i], max_tokens=2)
            hits, routes = _metric(url, "moe_serve_prefix_cache_hit_tokens_total"), \
                _metric(url, "moe_serve_router_prefix_routes_total")
            long = await asyncio.gather(*(client.completions.create(
                model="tiny", prompt=p, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
                for p in long_prompts))
            await client.close()
            return hits, routes, long
        hits, routes, long = asyncio.run(run())
        preemptions = _metric(url, "moe_serve_preemptions_total")
    # 5 full blocks of 16 per prompt; the first of each family computes them, the 7 others hit.
    assert sum(hits.values()) == 2 * 7 * 80
    assert sum(v for k, v in routes.items() if k.endswith("affinity")) == 16
    assert [r.choices[0].text for r in long] == expected
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 60 for r in long)
    assert sum(preemptions.values()) >= 1
