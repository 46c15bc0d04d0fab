"""The disaggregation tax: output tokens/s with the experts over gRPC against in-process.

What it measures
    One random-weight checkpoint (preset "bench", as engine_vs_hf: hidden 512, 4 layers,
    8 experts top-2, vocab 32000, fp32), one decode-heavy offline load: 64 prompts of random
    lengths 64-256 tokens (fixed seed), 64 new tokens each, greedy, EOS ignored, all added at
    once so that 64 sequences decode together. Figure: output tokens / wall seconds for the
    whole batch (prefill included), median of --repeats runs; the decode phase alone (the
    steps after the last prompt is in) is reported beside it.

    in-process  `cluster.local.build_engine`: the experts are called directly, torch's
                default threads (all cores), as in engine_vs_hf.
    gRPC        `connect_engine` to 4 expert shard processes on loopback
                (`start_shards(ckpt, split_experts(8, 4))`, one torch thread each, as the
                launcher sets for CPU shards), at micro_batches M = 1 and 2 (M = 2: the
                step's sequences are split in two halves whose attention and expert RPCs
                ping-pong). The attention process's torch threads are swept (--attn-threads,
                default 1 and 2): it shares the cores with the shards, and while it waits
                for them its OpenMP threads may spin. The best setting per M is reported,
                every one is printed.

    Ratio per M: best gRPC tokens/s / in-process tokens/s (target >= 0.8).

    Wire: the transport's own counters (GrpcTransport.stats). Request bytes per row sent
    (a row is one token sent to one expert group, with its expert ids and weights) over the
    minimum, hidden x dtype bytes (target <= 1.05); the same per (token, expert) pair (a row
    carries 1 or 2 pairs) and per reply row. These are message bytes: gRPC's own framing
    (HTTP/2 frames, headers) is not counted.

    RPC latency: the mean over the decode phase's RPCs of the best M = 1 setting
    (rpc_seconds / rpcs), next to the shards' own compute time per RPC (ExpertResult
    .compute_seconds, read by wrapping each replica's call; the transport is not changed),
    and next to a raw grpc.aio echo (bench-local server processes on 127.0.0.1 that return
    the request bytes) of the same payload size, one call at a time and with as many calls
    in flight as a layer's fan-out (one per shard). What is left after echo + compute is the
    cost of our code (codec, validation, event loop, thread hand-offs) and of 4 shard
    processes queueing for 2 cores.

    CPU: each run also records the CPU seconds of the attention process and of the shards
    (from /proc), so the tax can be split into its parts.

    On a shared machine: as engine_vs_hf (bench/common.py): each run waits for other
    processes to go quiet, contended runs (others took > 1/5 of a core; the shards and echo
    servers are ours, not others) are redone while --budget-s allows, medians are over the
    uncontended runs; the JSON (bench/out/disagg_tax.json) keeps every run.

Correctness check
    Every gRPC configuration's 64 ids per prompt must equal the in-process engine's exactly.
    Prints a CHECK line; exits 1 otherwise.

Run
    .venv/bin/python -m bench.disagg_tax            # the full run, about 4-5 minutes on 2 cores
    .venv/bin/python -m bench.disagg_tax --quick    # smoke run, well under a minute
    .venv/bin/python -m bench.disagg_tax --help
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch  # noqa: E402

from attention_service.config import EngineConfig  # noqa: E402
from attention_service.loader import connect_engine  # noqa: E402
from attention_service.sampling_params import SamplingParams  # noqa: E402
from bench import common  # noqa: E402
from cluster.local import build_engine  # noqa: E402
from expert_service.launcher import start_shards, stop_shards  # noqa: E402
from mixtral.config import load_model_config  # noqa: E402
from router.dispatch import split_experts  # noqa: E402

TARGET_RATIO = 0.8
TARGET_WIRE = 1.05
SHARDS = 4
QUICK = dict(prompts=8, min_len=16, max_len=64, new_tokens=8, repeats=1, micro_batches="1,2", attn_threads="1",
             echo_calls=50)
FULL = dict(prompts=64, min_len=64, max_len=256, new_tokens=64, repeats=3, micro_batches="1,2", attn_threads="1,2",
            echo_calls=300)
ECHO_PATH = "/bench.Echo/Echo"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"small smoke workload: {QUICK}")
    ap.add_argument("--prompts", type=int, help=f"number of prompts, all running at once (default {FULL['prompts']})")
    ap.add_argument("--min-len", type=int, help=f"shortest prompt (default {FULL['min_len']})")
    ap.add_argument("--max-len", type=int, help=f"longest prompt (default {FULL['max_len']})")
    ap.add_argument("--new-tokens", type=int, help=f"tokens generated per prompt (default {FULL['new_tokens']})")
    ap.add_argument("--repeats", type=int, help=f"timed runs of each setting (default {FULL['repeats']})")
    ap.add_argument("--micro-batches",
                    help=f"micro_batches values for the gRPC engine (default {FULL['micro_batches']})")
    ap.add_argument("--attn-threads", help=f"torch threads of the attention process with gRPC experts "
                                           f"(default {FULL['attn_threads']})")
    ap.add_argument("--mbt", type=int, default=2048, help="engine max_batched_tokens, both sides (default 2048)")
    ap.add_argument("--echo-calls", type=int, help=f"echo calls timed per payload size and concurrency "
                                                   f"(default {FULL['echo_calls']})")
    ap.add_argument("--seed", type=int, default=0, help="prompt RNG seed")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="no re-runs of contended runs or further repeats once this many seconds have passed")
    ap.add_argument("--max-retries", type=int, default=2, help="re-runs of one contended run, at most")
    ap.add_argument("--quiet-wait-s", type=float, default=10.0,
                    help="before each run, wait up to this long for other processes to go quiet (0: never)")
    ap.add_argument("--out", help="file name under bench/out/ (default disagg_tax.json, "
                                  "disagg_tax-quick.json with --quick)")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)   # internal: one echo server
    a = ap.parse_args()
    if a.echo_server:
        return a
    common.fill_defaults(a, QUICK, FULL)
    a.out = a.out or ("disagg_tax-quick.json" if a.quick else "disagg_tax.json")
    a.micro_batches = [int(x) for x in a.micro_batches.split(",")]
    a.attn_threads = [int(x) for x in a.attn_threads.split(",")]
    return a


# --- raw gRPC echo: the floor under our RPC latency ------------------------------------
async def _echo_server() -> None:
    import grpc

    from protos.channel import channel_options

    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server(options=channel_options())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def start_echo_servers(n: int) -> list[tuple[subprocess.Popen, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    out = []
    for p in procs:
        line = p.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError("echo server did not start")
        out.append((p, line[1]))
    return out


async def echo_latency(addresses: list[str], size: int, calls: int, in_flight: int) -> float:
    """Mean seconds per echo call of `size` bytes, in_flight calls at once (one per server
    address, round-robin), each call timed on its own as the transport times its RPCs."""
    import grpc

    from protos.channel import channel_options

    channels = [grpc.aio.insecure_channel(a, options=channel_options()) for a in addresses]
    stubs = [c.unary_unary(ECHO_PATH) for c in channels]
    payload = os.urandom(size)
    times: list[float] = []

    async def one(stub):
        t0 = time.perf_counter()
        reply = await stub(payload, timeout=30)
        times.append(time.perf_counter() - t0)
        assert len(reply) == size

    try:
        for i in range(10):                              # connect and warm up
            await one(stubs[i % len(stubs)])
        times.clear()
        for r in range(max(1, calls // in_flight)):
            await asyncio.gather(*(one(stubs[(r * in_flight + j) % len(stubs)]) for j in range(in_flight)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return statistics.mean(times)


# --- the engine side -------------------------------------------------------------------
class Counters:
    """What a run did, read from hooks: routed tokens and (token, expert) pairs at every layer
    (ModelRunner.on_route), and, for gRPC, the shards' compute seconds and pairs per RPC
    (each replica's Forward call wrapped to read ExpertResult.compute_seconds and .rows)."""

    def __init__(self, engine):
        self.tokens = self.pairs = 0
        self.compute_s = 0.0
        self.shard_pairs = 0
        engine.runner.on_route = self._route
        transport = engine.transport
        if hasattr(transport, "replicas"):
            for replicas in transport.replicas:
                for r in replicas:
                    r.forward = self._wrap(r.forward)
        else:                               # in-process: time the expert calls themselves
            transport.forward = self._timed(transport.forward)

    def _timed(self, forward):
        async def call(layer, y, batches):
            t0 = time.perf_counter()
            out = await forward(layer, y, batches)
            self.compute_s += time.perf_counter() - t0
            return out
        return call

    def _route(self, layer: int, ids: torch.Tensor) -> None:
        self.tokens += ids.shape[0]
        self.pairs += ids.numel()

    def _wrap(self, forward):
        async def call(*args, **kwargs):
            msg, tensors = await forward(*args, **kwargs)
            self.compute_s += msg.compute_seconds
            self.shard_pairs += msg.rows
            return msg, tensors
        return call

    def snapshot(self, engine) -> dict:
        st = getattr(engine.transport, "stats", None)
        d = {"tokens": self.tokens, "pairs": self.pairs, "compute_s": self.compute_s, "shard_pairs": self.shard_pairs}
        if st is not None:
            d.update(rpcs=st.rpcs, rows=st.rows, bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
                     rpc_seconds=st.rpc_seconds, failovers=st.failovers)
        return d


def diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in b}


class Side:
    """One configuration: an engine, its torch threads, and what its runs recorded."""

    def __init__(self, name: str, engine, threads: int, micro_batches: int, grpc: bool):
        self.name, self.engine, self.threads, self.m, self.grpc = name, engine, threads, micro_batches, grpc
        self.counters = Counters(engine)
        self.samples: list[common.Sample] = []
        self.runs: list[dict] = []        # per completed run: phases, counters, CPU
        self.outputs = None


def run_batch(loop, side: Side, prompts, n: int, shard_pids: list[int], abort=None) -> list[list[int]]:
    """Add every prompt, step until done (checking abort between steps); records the run's
    phases, counters and CPU in side.runs. An aborted run cancels its requests."""
    eng = side.engine
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    torch.set_num_threads(side.threads)

    async def go():
        c0, cpu0, sh0 = side.counters.snapshot(eng), sum(os.times()[:4]), common.pids_cpu_s(shard_pids)
        t0 = time.perf_counter()
        seqs = [eng.add(p, params) for p in prompts]
        mark, steps = None, 0
        while eng.scheduler.has_work:
            if abort is not None and abort.is_set():
                for s in seqs:
                    eng.cancel(s)
                raise common.Aborted
            await eng.step()
            steps += mark is not None
            if mark is None and all(s.num_computed >= s.num_prompt_tokens or s.is_finished for s in seqs):
                mark = (time.perf_counter(), side.counters.snapshot(eng), sum(s.num_output for s in seqs))
        t1 = time.perf_counter()
        c1 = side.counters.snapshot(eng)
        run = {"wall_s": t1 - t0, "prefill_s": mark[0] - t0, "decode_s": t1 - mark[0],
               "decode_tokens": sum(s.num_output for s in seqs) - mark[2], "decode_steps": steps,
               "attention_cpu_s": sum(os.times()[:4]) - cpu0, "shard_cpu_s": common.pids_cpu_s(shard_pids) - sh0,
               "all": diff(c0, c1), "decode": diff(mark[1], c1)}
        side.runs.append(run)
        return [s.output_ids for s in seqs]

    return loop.run_until_complete(go())


def isolated_rpcs(loop, side: Side, hidden: int, rows: int, calls: int, fanout: int) -> tuple[float, float]:
    """Our RPC path alone: `calls` rounds of transport.forward on layer 0 with `fanout` groups'
    batches of `rows` synthetic decode rows each (slot 0 an expert of the group, slot 1 empty
    but for every 13th row, as in the decode load), nothing else running.
    -> (mean RPC seconds as the transport times it, mean shard compute seconds per RPC)."""
    from router.dispatch import GroupBatch

    eng = side.engine
    torch.set_num_threads(side.threads)
    group_of = eng.runner.placement.group_of[0]
    g = torch.Generator().manual_seed(1)
    y = torch.randn(rows * fanout, hidden, generator=g)
    batches = []
    for grp in range(fanout):
        experts = (group_of == grp).nonzero().squeeze(1)
        ids = torch.full((rows, 2), -1, dtype=torch.int32)
        ids[:, 0] = experts[torch.arange(rows) % len(experts)]
        ids[::13, 1] = experts[(torch.arange(rows)[::13] + 1) % len(experts)]
        w = torch.where(ids >= 0, 0.5, 0.0)
        batches.append(GroupBatch(grp, torch.arange(grp * rows, (grp + 1) * rows), ids, w))
    t = eng.transport

    async def go():
        for _ in range(5):
            await t.forward(0, y, batches)
        c0 = side.counters.snapshot(eng)
        for _ in range(calls):
            await t.forward(0, y, batches)
        d = diff(c0, side.counters.snapshot(eng))
        return d["rpc_seconds"] / d["rpcs"], d["compute_s"] / d["rpcs"]

    return loop.run_until_complete(go())


def figure(side: Side, out_tokens: int) -> dict:
    """Median figures over the uncontended completed runs (all completed runs if none is)."""
    med, k, clean = common.median_wall(side.samples)
    done = [s for s in side.samples if not s.aborted]
    keep = [r for s, r in zip(done, side.runs) if not s.contended] if clean else side.runs
    return {"tokens_per_s": out_tokens / med, "median_s": med, "runs_in_median": k, "uncontended": clean,
            "decode_tokens_per_s": statistics.median(r["decode_tokens"] / r["decode_s"] for r in keep),
            "prefill_s": statistics.median(r["prefill_s"] for r in keep),
            "attention_cpu_s": statistics.median(r["attention_cpu_s"] for r in keep),
            "shard_cpu_s": statistics.median(r["shard_cpu_s"] for r in keep),
            "shard_compute_s": statistics.median(r["all"]["compute_s"] for r in keep)}


def last_clean_run(side: Side) -> dict:
    """The last completed run that no other process contended (the last completed one if none)."""
    done = [x for x in side.samples if not x.aborted]
    clean = [r for x, r in zip(done, side.runs) if not x.contended]
    return (clean or side.runs)[-1]


def tag(f: dict) -> str:
    return "" if f["uncontended"] else " (contended: other processes were busy)"


def main() -> int:
    a = parse_args()
    if a.echo_server:
        asyncio.run(_echo_server())
        return 0
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    ckpt = common.checkpoint("bench")
    mc = load_model_config(ckpt)
    prompts = common.random_prompts(a.prompts, a.min_len, a.max_len, mc.vocab_size, a.seed)
    n = a.new_tokens
    out_tokens = n * len(prompts)
    prompt_tokens = sum(map(len, prompts))
    machine = common.announce_machine("disagg_tax")
    print(f"disagg_tax workload: prompts={len(prompts)} (all running at once) prompt_tokens={prompt_tokens} "
          f"lengths={min(map(len, prompts))}-{max(map(len, prompts))} new_tokens={n} output_tokens={out_tokens} "
          f"max_batched_tokens={a.mbt}", flush=True)

    kv_bytes = 2 * mc.kv_bytes_per_token(4) * (prompt_tokens + out_tokens + 16 * len(prompts))
    cfg = dict(max_batched_tokens=a.mbt, kv_cache_bytes=kv_bytes)
    groups = split_experts(mc.num_local_experts, SHARDS)
    shards = start_shards(ckpt, groups)
    pids = [s.process.pid for s in shards]
    addresses = [s.address for s in shards]
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sides: list[Side] = []
    echo = []
    try:
        torch.set_num_threads(default_threads)
        inproc = Side(f"in-process threads={default_threads}", build_engine(ckpt, EngineConfig(**cfg))[0],
                      default_threads, 1, False)
        sides.append(inproc)
        for m in a.micro_batches:
            for th in a.attn_threads:
                torch.set_num_threads(th)      # before the engine's compute thread (M > 1) first runs
                eng = loop.run_until_complete(connect_engine(ckpt, addresses, EngineConfig(micro_batches=m, **cfg)))[0]
                sides.append(Side(f"gRPC M={m} attn_threads={th}", eng, th, m, True))
        warm = prompts[:2]
        for s in sides:
            run_batch(loop, s, warm, 4, pids)
            s.runs.clear()
        print(f"disagg_tax setup_s={time.perf_counter() - t_start:.1f} shards={SHARDS} experts={groups} "
              f"(one torch thread each)", flush=True)

        runner = common.Runner(t_start, a.budget_s, a.max_retries, a.quiet_wait_s, own_pids=pids)
        log = lambda msg: print(msg, flush=True)  # noqa: E731

        def timed_run(s: Side, label: str):
            out = runner.run(label, lambda abort: run_batch(loop, s, prompts, n, pids, abort), s.samples, log)
            if out is not None:
                s.outputs = out

        for r in range(a.repeats):
            if r and runner.over_budget:
                print(f"disagg_tax WARNING: time budget of {a.budget_s:.0f} s spent; no more repeats")
                break
            for s in sides:     # interleaved, so every side sees the same machine
                timed_run(s, s.name + (f" (repeat {r + 1})" if r else ""))

        figs = {s.name: figure(s, out_tokens) for s in sides}
        for s in sides:
            f = figs[s.name]
            print(f"disagg_tax {s.name} tokens_per_s={f['tokens_per_s']:.1f} decode_tokens_per_s="
                  f"{f['decode_tokens_per_s']:.1f} prefill_s={f['prefill_s']:.2f} (median of {f['runs_in_median']} "
                  f"runs, {f['median_s']:.2f} s){tag(f)}", flush=True)

        # --- ratios --------------------------------------------------------------------
        ip = figs[inproc.name]
        best: dict[int, Side] = {}
        for m in a.micro_batches:
            pool = [s for s in sides if s.grpc and s.m == m]
            clean = [s for s in pool if figs[s.name]["uncontended"]] or pool
            best[m] = max(clean, key=lambda s: figs[s.name]["tokens_per_s"])
        ratios = {}
        for m, s in best.items():
            f = figs[s.name]
            ratios[m] = f["tokens_per_s"] / ip["tokens_per_s"]
            dec = f["decode_tokens_per_s"] / ip["decode_tokens_per_s"]
            print(f"disagg_tax ratio_M{m}={ratios[m]:.2f} (gRPC M={m} best attn_threads={s.threads}: "
                  f"{f['tokens_per_s']:.1f} / in-process {ip['tokens_per_s']:.1f} tokens/s; target >= {TARGET_RATIO}: "
                  f"{'met' if ratios[m] >= TARGET_RATIO else 'NOT met'}); decode phase alone {dec:.2f}")

        # --- CPU: where the tax goes ------------------------------------------------------
        per_k = 1000 / out_tokens
        print(f"disagg_tax cpu_s_per_1k_tokens {inproc.name}: total={ip['attention_cpu_s'] * per_k:.2f} "
              f"(expert calls {ip['shard_compute_s'] * per_k:.2f} wall-s of it; "
              f"run wall {ip['median_s'] * per_k:.2f} s "
              f"on {machine['cores']} cores)")
        for m, s in best.items():
            f = figs[s.name]
            print(f"disagg_tax cpu_s_per_1k_tokens gRPC M={m} attn_threads={s.threads}: total="
                  f"{(f['attention_cpu_s'] + f['shard_cpu_s']) * per_k:.2f} = "
                  f"attention {f['attention_cpu_s'] * per_k:.2f}"
                  f" + shards {f['shard_cpu_s'] * per_k:.2f} (expert compute {f['shard_compute_s'] * per_k:.2f} wall-s "
                  f"summed over the shards' own timings; run wall {f['median_s'] * per_k:.2f} s)")
        for m, s in best.items():
            r = last_clean_run(s)
            d = r["decode"]
            print(f"disagg_tax decode_rpc gRPC M={m} attn_threads={s.threads}: "
                  f"rows_per_rpc={d['rows'] / d['rpcs']:.1f} "
                  f"shard_compute_per_rpc_ms={d['compute_s'] / d['rpcs'] * 1e3:.2f} rpcs_per_step="
                  f"{d['rpcs'] / max(1, r['decode_steps']):.1f} "
                  f"(each RPC reads its shard's expert weights once: compute "
                  f"hardly shrinks with the rows)")

        # --- wire -----------------------------------------------------------------------
        ref = best[1] if 1 in best else best[a.micro_batches[0]]
        w = last_clean_run(ref)["all"]
        minimum = mc.hidden_size * 4       # fp32
        per_row = w["bytes_sent"] / w["rows"]
        per_pair = w["bytes_sent"] / w["pairs"]
        reply_row = w["bytes_received"] / w["rows"]
        wire_ratio = per_row / minimum
        print(f"disagg_tax wire_request_bytes_per_row={per_row:.1f} minimum={minimum} (hidden {mc.hidden_size} x fp32) "
              f"ratio={wire_ratio:.4f} (target <= {TARGET_WIRE}: {'met' if wire_ratio <= TARGET_WIRE else 'NOT met'}); "
              f"gRPC M={ref.m}, {w['rpcs']} RPCs, {w['rows']} rows")
        print(f"disagg_tax wire_request_bytes_per_pair={per_pair:.1f} ratio={per_pair / minimum:.4f} "
              f"({w['pairs']} (token, expert) pairs = {w['pairs'] / w['rows']:.3f} per row: a token whose two "
              f"experts share a shard is sent once); rows per routed token-layer={w['rows'] / w['tokens']:.3f} "
              f"(of {mc.num_experts_per_tok} at most)")
        print(f"disagg_tax wire_reply_bytes_per_row={reply_row:.1f} ratio={reply_row / minimum:.4f}")

        # --- RPC latency against a raw echo ---------------------------------------------
        d = last_clean_run(ref)["decode"]
        rpc_ms = d["rpc_seconds"] / d["rpcs"] * 1e3
        comp_ms = d["compute_s"] / d["rpcs"] * 1e3
        size = round(d["bytes_sent"] / d["rpcs"])
        al = w
        size_all = round(al["bytes_sent"] / al["rpcs"])
        rpc_all_ms = al["rpc_seconds"] / al["rpcs"] * 1e3
        echo = start_echo_servers(SHARDS)
        echo_addr = [addr for _, addr in echo]
        common.wait_for_quiet(a.quiet_wait_s, own_pids=pids + [p.pid for p, _ in echo])
        torch.set_num_threads(ref.threads)
        e1 = loop.run_until_complete(echo_latency(echo_addr, size, a.echo_calls, 1)) * 1e3
        eN = loop.run_until_complete(echo_latency(echo_addr, size, a.echo_calls, SHARDS)) * 1e3
        e1_all = loop.run_until_complete(echo_latency(echo_addr, size_all, max(20, a.echo_calls // 5), 1)) * 1e3
        rows = round(d["rows"] / d["rpcs"])
        iso1, iso1_c = isolated_rpcs(loop, ref, mc.hidden_size, rows, a.echo_calls, 1)
        isoN, isoN_c = isolated_rpcs(loop, ref, mc.hidden_size, rows, max(1, a.echo_calls // SHARDS), SHARDS)
        fan = SHARDS * ref.m
        print(f"disagg_tax rpc_mean_ms decode={rpc_ms:.2f} (gRPC M={ref.m} attn_threads={ref.threads}, "
              f"{d['rpcs']} RPCs, "
              f"request {size / 1024:.1f} KiB, up to {fan} in flight; shard compute {comp_ms:.2f} ms of it)")
        print(f"disagg_tax echo_ms size={size / 1024:.1f}KiB one_in_flight={e1:.2f} {SHARDS}_in_flight={eN:.2f} "
              f"-> rpc - echo({SHARDS}) - compute = {rpc_ms - eN - comp_ms:.2f} ms per RPC (our code + CPU queueing)")
        print(f"disagg_tax rpc_alone_ms rows={rows}: one_in_flight={iso1 * 1e3:.2f} (shard compute {iso1_c * 1e3:.2f}, "
              f"echo {e1:.2f} -> our code {(iso1 - iso1_c) * 1e3 - e1:.2f} ms per RPC) "
              f"{SHARDS}_in_flight={isoN * 1e3:.2f} "
              f"(shard compute {isoN_c * 1e3:.2f}, echo {eN:.2f} -> the rest {(isoN - isoN_c) * 1e3 - eN:.2f} ms); "
              f"nothing else running, synthetic rows")
        print(f"disagg_tax rpc_mean_ms whole_run={rpc_all_ms:.2f} (request {size_all / 1024:.1f} KiB mean, shard "
              f"compute {al['compute_s'] / al['rpcs'] * 1e3:.2f} ms) echo_ms one_in_flight={e1_all:.2f}")

        # --- check ----------------------------------------------------------------------
        lengths_ok = all(len(o) == n for s in sides for o in (s.outputs or [None]) if o is not None) and \
            all(s.outputs is not None for s in sides)
        blocks_ok = all(s.engine.blocks_all_free for s in sides)
        failovers = sum(s.engine.transport.stats.failovers for s in sides if s.grpc)
        per_side = {s.name: sum(x == y for x, y in zip(s.outputs or [], inproc.outputs or [])) for s in sides if s.grpc}
        ok = lengths_ok and blocks_ok and failovers == 0 and all(v == len(prompts) for v in per_side.values())
        print(f"CHECK {'OK' if ok else 'FAIL'}: gRPC vs in-process, exact ids per prompt: "
              + ", ".join(f"{k}: {v}/{len(prompts)}" for k, v in per_side.items())
              + f"; {n} tokens each: {lengths_ok}; KV blocks returned: {blocks_ok}; failovers: {failovers}")
        contended = sum(x.contended for s in sides for x in s.samples)
        total = sum(len(s.samples) for s in sides)
        if contended:
            print(f"disagg_tax WARNING: {contended} of {total} runs shared the CPU with other processes "
                  f"(left out of the medians where a clean run exists; all in the JSON)")
        total_s = time.perf_counter() - t_start
        print(f"disagg_tax total_s={total_s:.0f}")

        path = common.write_json(a.out, {
            "benchmark": "disagg_tax", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine,
            "checkpoint": str(ckpt),
            "model": {"preset": "bench", "hidden": mc.hidden_size, "layers": mc.num_hidden_layers,
                      "experts": mc.num_local_experts, "top_k": mc.num_experts_per_tok, "vocab": mc.vocab_size,
                      "dtype": "float32"},
            "workload": {"prompts": len(prompts), "prompt_lens": [len(p) for p in prompts],
                         "prompt_tokens": prompt_tokens, "new_tokens": n, "output_tokens": out_tokens, "seed": a.seed,
                         "greedy": True, "ignore_eos": True, "max_batched_tokens": a.mbt, "kv_cache_bytes": kv_bytes},
            "shards": {"count": SHARDS, "experts": groups, "torch_threads_each": 1},
            "sides": {s.name: {"threads": s.threads, "micro_batches": s.m, "grpc": s.grpc, **figs[s.name],
                               "samples": s.samples, "runs": s.runs} for s in sides},
            "ratios": {f"M={m}": {"ratio": r, "best": best[m].name} for m, r in ratios.items()},
            "target_ratio": TARGET_RATIO,
            "wire": {"from": ref.name, "request_bytes_per_row": per_row, "request_bytes_per_pair": per_pair,
                     "reply_bytes_per_row": reply_row, "minimum": minimum, "ratio": wire_ratio,
                     "target": TARGET_WIRE, **w},
            "rpc": {"from": ref.name, "decode_mean_ms": rpc_ms, "decode_compute_ms": comp_ms,
                    "decode_request_bytes": size,
                    "echo_one_in_flight_ms": e1, f"echo_{SHARDS}_in_flight_ms": eN, "whole_run_mean_ms": rpc_all_ms,
                    "whole_run_request_bytes": size_all, "echo_whole_run_size_ms": e1_all,
                    "alone": {"rows": rows, "one_in_flight_ms": iso1 * 1e3, "one_in_flight_compute_ms": iso1_c * 1e3,
                              f"{SHARDS}_in_flight_ms": isoN * 1e3, f"{SHARDS}_in_flight_compute_ms": isoN_c * 1e3}},
            "check": {"ok": ok, "exact_prompts": per_side, "lengths_ok": lengths_ok, "blocks_ok": blocks_ok,
                      "failovers": failovers},
            "contended_runs": contended, "total_s": total_s,
        })
        print(f"disagg_tax wrote {path.relative_to(common.REPO)}")
        return 0 if ok else 1
    finally:
        for s in sides:
            if s.grpc:
                loop.run_until_complete(s.engine.close())
        for p, _ in echo:
            p.terminate()
        for p, _ in echo:
            p.wait(10)
        stop_shards(shards)


if __name__ == "__main__":
    sys.exit(main())
