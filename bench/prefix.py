"""Prefix caching and cache-aware routing: what reusing KV blocks buys on prompts that share prefixes.

What it measures
    Part 1, the engine in this process (`AsyncEngine`, experts in-process, preset "bench":
    hidden 512, 4 layers, fp32), each workload with prefix caching on and off, in one run:
      shared   --requests requests (default 64) arriving as a Poisson process (--rate per
               second): one --system-token system prompt (default 2,048), then 64-256 tokens
               of their own; --max-tokens each (default 32), greedy, EOS ignored.
      chat     --conversations conversations (default 8) of --turns turns (default 4), all
               at once: each turn's prompt is the conversation so far (a 256-token opening,
               then every earlier question and answer) plus a new 32-96-token question.
    Figures per workload and setting (medians over --repeats runs): TTFT p50/p99 (arrival to
    first token), output tokens/s (tokens / first arrival to last token), and the prefix
    cache's hit rate (prompt tokens served from the cache / prompt tokens). Ratios: TTFT p50
    on / off (target <= 0.3 on shared) and tokens/s on / off (target >= 2 on shared).

    Part 2, the served app (unless --skip-app) with 2 Attention replicas and 1 expert group
    on a local loopback Ray cluster, preset "tiny": --families system prompts (default 4) of
    --system tokens, --per-family requests each (default 8), sent by 4 concurrent clients in
    an interleaved order, once with cache-aware routing (attention.prefix_routing) and once
    with Serve's default (the less loaded of two random replicas). Figure: the app's hit rate
    (summed over replicas from /metrics) / the hit rate of one engine serving the same
    requests in the same order (target >= 0.9 with cache-aware routing).

Correctness check
    Part 1: every request's greedy tokens are the same with caching on and off. Part 2: each
    app's answers equal the single engine's. Exits 1 on a mismatch.

Run
    .venv/bin/python -m bench.prefix              # the full run, about 5 minutes on 2 cores
    .venv/bin/python -m bench.prefix --quick      # smoke run, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
import urllib.request

import torch

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from bench import common
from bench.engine_load import serve, serving_figures
from cluster.local import build_engine
from cluster.observe.metrics_gather import parse, samples
from mixtral.config import load_model_config

FULL = dict(requests=64, rate=4.0, system=2048, max_tokens=32, conversations=8, turns=4, repeats=2,
            families=4, per_family=8)
QUICK = dict(requests=12, rate=8.0, system=512, max_tokens=8, conversations=3, turns=3, repeats=1,
             families=2, per_family=4)
TARGET_TTFT, TARGET_TPS, TARGET_HIT = 0.3, 2.0, 0.9


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run at small sizes")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), help=f"(default {v}; --quick {QUICK[k]})")
    ap.add_argument("--block-size", type=int, default=16, help="KV block, in tokens (default 16)")
    ap.add_argument("--skip-app", action="store_true", help="part 1 only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="prefix.json", help="file name under bench/out/")
    a = ap.parse_args()
    common.fill_defaults(a, QUICK, FULL)
    return a


def tokens(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=g).tolist()


# --- part 1: the engine, caching on and off ------------------------------------------------
def shared_workload(a) -> tuple[list[list[int]], list[float]]:
    g = torch.Generator().manual_seed(a.seed)
    system = [1] + tokens(g, a.system - 1)
    prompts = [system + tokens(g, int(torch.randint(64, 257, (1,), generator=g))) for _ in range(a.requests)]
    gaps = torch.empty(a.requests).exponential_(1.0, generator=g) / a.rate
    gaps[0] = 0.0
    return prompts, torch.cumsum(gaps, 0).tolist()


async def chat(aeng: AsyncEngine, a) -> list[dict]:
    """Conversations in parallel, turns in order; -> per turn the serve() record."""
    g = torch.Generator().manual_seed(a.seed + 1)
    openings = [[1] + tokens(g, 255) for _ in range(a.conversations)]
    questions = [[tokens(g, int(torch.randint(32, 97, (1,), generator=g))) for _ in range(a.turns)]
                 for _ in range(a.conversations)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)

    async def conversation(c: int) -> list[dict]:
        so_far, recs = list(openings[c]), []
        for t in range(a.turns):
            prompt = so_far + questions[c][t]
            rec = {"arrival": time.perf_counter(), "times": [], "ids": []}
            async for d in aeng.generate(prompt, params):
                rec["times"] += [time.perf_counter()] * len(d.token_ids)
                rec["ids"] += d.token_ids
            recs.append(rec)
            so_far = prompt + rec["ids"]
        return recs

    return [r for rs in await asyncio.gather(*(conversation(c) for c in range(a.conversations))) for r in rs]


def run_setting(ckpt, a, caching: bool, loop) -> dict:
    """Both workloads on a fresh engine each, `repeats` times -> figures and outputs."""
    out: dict = {}
    for name in ("shared", "chat"):
        runs, outputs = [], None
        for _ in range(a.repeats):
            engine, tok = build_engine(ckpt, EngineConfig(block_size=a.block_size, prefix_caching=caching))
            aeng = AsyncEngine(engine, tok)
            before = engine.prefix_stats.queried_tokens, engine.prefix_stats.hit_tokens
            if name == "shared":
                prompts, arrivals = shared_workload(a)
                recs = loop.run_until_complete(serve(aeng, prompts, [a.max_tokens] * len(prompts), arrivals))
            else:
                recs = loop.run_until_complete(chat(aeng, a))
            st = engine.prefix_stats
            queried, hit = st.queried_tokens - before[0], st.hit_tokens - before[1]
            fig = serving_figures(recs)
            fig["hit_rate"] = hit / queried if queried else 0.0
            runs.append(fig)
            outputs = [r["ids"] for r in recs]
            loop.run_until_complete(aeng.close())
        out[name] = {k: statistics.median(r[k] for r in runs)
                     for k in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "hit_rate")}
        out[name]["outputs"] = outputs
    return out


def part1(a, loop, result: dict) -> bool:
    ckpt = common.checkpoint("bench")
    on = run_setting(ckpt, a, True, loop)
    off = run_setting(ckpt, a, False, loop)
    ok = True
    for name in ("shared", "chat"):
        f_on, f_off = on[name], off[name]
        same = f_on.pop("outputs") == f_off.pop("outputs")
        ok &= same
        ttft = f_on["ttft_p50_s"] / f_off["ttft_p50_s"]
        tps = f_on["tokens_per_s"] / f_off["tokens_per_s"]
        for label, f in (("on", f_on), ("off", f_off)):
            print(f"prefix {name} caching={label}: ttft_p50_ms={f['ttft_p50_s'] * 1e3:.0f} "
                  f"ttft_p99_ms={f['ttft_p99_s'] * 1e3:.0f} tokens_per_s={f['tokens_per_s']:.1f} "
                  f"hit_rate={f['hit_rate']:.3f}", flush=True)
        targets = f" (targets <= {TARGET_TTFT} and >= {TARGET_TPS})" if name == "shared" else ""
        print(f"prefix {name} ratio on/off: ttft_p50={ttft:.3f} tokens_per_s={tps:.2f}{targets}; "
              f"same tokens: {same}", flush=True)
        result[name] = {"on": f_on, "off": f_off, "ttft_p50_ratio": ttft, "tokens_per_s_ratio": tps, "same": same}
    return ok


# --- part 2: the served app, cache-aware vs default routing --------------------------------
def app_workload(a) -> list[list[int]]:
    """families x per_family prompts, interleaved across families (a b c d a b c d ...)."""
    g = torch.Generator().manual_seed(a.seed + 2)
    heads = [[1] + tokens(g, a.system - 1) for _ in range(a.families)]
    by_family = [[h + tokens(g, 24) for _ in range(a.per_family)] for h in heads]
    return [by_family[f][i] for i in range(a.per_family) for f in range(a.families)]


async def send_all(url: str, prompts: list[list[int]], max_tokens: int, clients: int = 4) -> list[list[int]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    out: list = [None] * len(prompts)
    todo = collections.deque(range(len(prompts)))

    async def worker() -> None:
        while todo:
            i = todo.popleft()
            r = await client.completions.create(model="bench", prompt=prompts[i], max_tokens=max_tokens,
                                                temperature=0, logprobs=0, extra_body={"ignore_eos": True})
            out[i] = r.choices[0].logprobs.tokens
    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    return out


def app_hit_rate(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        fams = parse(r.read().decode())
    hit = sum(s.value for s in samples(fams, "moe_serve_prefix_cache_hit_tokens_total"))
    queried = sum(s.value for s in samples(fams, "moe_serve_prefix_cache_queried_tokens_total"))
    return hit / queried if queried else 0.0


def part2(a, loop, result: dict) -> bool:
    from cluster.tools.harness import running_app

    ckpt = common.checkpoint("tiny")
    prompts = app_workload(a)
    engine, tok = build_engine(ckpt, EngineConfig(block_size=a.block_size))
    single = [loop.run_until_complete(engine.generate([p], SamplingParams(max_tokens=4, temperature=0,
                                                                         ignore_eos=True)))[0].output_ids
              for p in prompts]
    single_rate = engine.prefix_stats.hit_tokens / engine.prefix_stats.queried_tokens
    want = [[tok.piece(t).replace("\u2581", " ") for t in ids] for ids in single]
    ok = True
    for routing in (True, False):
        cfg = {"model_name": "bench", "groups": 1, "autoscaling": {"enabled": False},
               "attention": {"replicas": 2, "prefix_routing": {"enabled": routing},
                             "engine": {"block_size": a.block_size}}}
        with running_app(ckpt, **cfg) as (_, url, _):
            got = loop.run_until_complete(send_all(url, prompts, 4))
            rate = app_hit_rate(url)
        same = got == want
        ok &= same
        label = "cache-aware" if routing else "serve-default"
        print(f"prefix app routing={label}: hit_rate={rate:.3f} single_replica_hit_rate={single_rate:.3f} "
              f"ratio={rate / single_rate:.3f} (target >= {TARGET_HIT} cache-aware); same tokens: {same}",
              flush=True)
        result[f"app_{label}"] = {"hit_rate": rate, "single_replica_hit_rate": single_rate,
                                  "ratio": rate / single_rate, "same": same}
    return ok


def main() -> int:
    a = parse_args()
    t0 = time.perf_counter()
    result: dict = {"args": vars(a), "machine": common.announce_machine("prefix")}
    mc = load_model_config(common.checkpoint("bench"))
    print(f"prefix model: bench (hidden {mc.hidden_size}, {mc.num_hidden_layers} layers); block_size={a.block_size}; "
          f"shared: {a.requests} requests, {a.system}-token system prompt, rate {a.rate}/s; "
          f"chat: {a.conversations} x {a.turns} turns; max_tokens={a.max_tokens}; repeats={a.repeats}", flush=True)
    loop = asyncio.new_event_loop()
    ok = part1(a, loop, result)
    if not a.skip_app:
        ok &= part2(a, loop, result)
    result["check"] = ok
    result["total_s"] = time.perf_counter() - t0
    print(f"CHECK {'OK' if ok else 'FAILED'}: greedy tokens equal with and without cache hits and across routing")
    print(f"prefix total_s={result['total_s']:.0f}\nprefix wrote {common.write_json(a.out, result)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
