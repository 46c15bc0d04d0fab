"""Streaming load on the Ray Serve application against the bare engine on the same load.

What it measures
    N concurrent clients (--clients, default 8), each in a closed loop: send a streaming
    /v1/completions request with the official `openai` AsyncOpenAI client, read it to the
    end, send the next. Requests come from one fixed mix (seed 0) of 64 prompts given as
    token ids, lengths uniform in 32-512, each with max_tokens uniform in 32-64; greedy
    (temperature 0), EOS ignored (`ignore_eos` through extra_body), so every request yields
    exactly max_tokens. Client i sends mix entries i, i+N, i+2N, ... so all sides see the
    same sequence. Clients start together; the first --ramp-s seconds are not measured,
    then a window of --seconds (default 30); no request starts after the window and the
    ones in flight are read to the end (drained), not cancelled.

    Figures over the window, per side:
      requests/s          requests that finished inside the window / window
      output tokens/s     tokens received inside the window / window (a request's tokens are
                          spread evenly over its chunks, to count the one in flight at the edge)
      TTFT                request sent -> first chunk with text, over requests sent in the window
      TPOT                (last chunk - first chunk) / (tokens - 1), per request, same requests
      errors              failed requests, or ones with fewer tokens than asked, in any phase
    Throughputs are medians over --repeats runs; TTFT and TPOT percentiles are over the
    requests of every counted run pooled.

    served      the app: `cluster.tools.harness.running_app` on a local loopback Ray cluster (the
                default AppConfig: Frontend ingress + 1 Attention replica + 2 expert groups
                of 4 whole experts each, replicas talking gRPC; expert autoscaling off, so
                one replica per group as on bare-grpc, unless --autoscale); or an app already running
                (`--url`, e.g. from `moe-serve up`). Ray gives each replica OMP_NUM_THREADS=1.
    bare        the same checkpoint in an in-process `AsyncEngine` (experts in-process, torch's
                default threads), driven by N asyncio tasks in this process through
                `AsyncEngine.generate`: no Ray, no HTTP, no gRPC.
    bare-grpc   the same, but the experts in 2 `expert_service` shard processes (same split as
                the app, 1 thread each, `start_shards`) reached over gRPC (`connect_engine`), and
                this process's torch on 1 thread like the Attention replica: the app's process
                layout minus Ray Serve and HTTP.
    The target (>= 0.7) is on "the cost of Ray Serve and HTTP": served / bare-grpc, the
    same engine and expert processes with and without Serve and HTTP around them. served /
    bare also prints, with the disaggregation share of it (bare-grpc / bare: on two shared
    cores the expert processes take their CPU from the attention side's; across machines
    they would not, see bench/disagg_tax.py).
    All sides use the default EngineConfig. Every side gets a warm-up (one short request
    per client) before its runs. Per run, CPU time is also split by process (this process
    = the clients, or the clients + attention for the bare sides; every Ray process by
    name), as ms of CPU per output token.

    Model: random-weight checkpoint of preset "bench" (hidden 512, 4 layers, 8 experts
    top-2, vocab 32000, fp32): big enough that a step's matmuls, not Python, dominate, as
    they would with a real model. On the "tiny" preset (hidden 64) each request's work is a
    few ms of Python, so every side measures per-token overheads only.

    On a shared machine: each run waits (up to --quiet-wait-s) for processes outside this
    benchmark's own process tree (this process, Ray and its workers, the shards) to go
    quiet; a run during which they took more than a fifth of a core is marked contended and
    redone while --budget-s allows. Medians leave contended runs out where a clean run exists.
    With --url the app's processes are not ours: they count as "others", so contention is
    not judged there.

Correctness check
    Before the load, 4 prompts of the mix (max_tokens 32, greedy, EOS ignored), one at a
    time, through the app's HTTP API with logprobs=0 (so the reply names its tokens): their
    tokens and text must equal the in-process engine's. Prints a CHECK line; exits 1 on a
    mismatch (and on any error under load).

Run
    .venv/bin/python -m bench.app_load            # the full run, about 4-5 min on 2 cores
    .venv/bin/python -m bench.app_load --quick    # smoke run, under a minute
    .venv/bin/python -m bench.app_load --url http://127.0.0.1:8000 --model PATH   # a running app
"""

from __future__ import annotations

# Before ray is imported: keep the local cluster on loopback (see tests/conftest.py).
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from attention_service.async_engine import AsyncEngine  # noqa: E402
from attention_service.config import EngineConfig  # noqa: E402
from attention_service.loader import connect_engine  # noqa: E402
from attention_service.sampling_params import SamplingParams  # noqa: E402
from bench import common  # noqa: E402
from cluster.api.backend import token_text  # noqa: E402
from cluster.local import build_engine  # noqa: E402
from mixtral.config import load_model_config  # noqa: E402
from router.dispatch import split_experts  # noqa: E402

TARGET_RATIO = 0.7
GROUPS = 2            # the app's default: whole experts dealt round-robin into 2 groups
CHECK_PROMPTS, CHECK_TOKENS = 4, 32
QUICK = dict(clients=4, seconds=4.0, ramp_s=1.0, repeats=1, min_len=16, max_len=128, min_new=16, max_new=32,
             max_retries=0, quiet_wait_s=2.0)
FULL = dict(clients=8, seconds=30.0, ramp_s=3.0, repeats=2, min_len=32, max_len=512, min_new=32, max_new=64,
            max_retries=1, quiet_wait_s=10.0)
SIDES = ("served", "bare", "bare-grpc")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    ap.add_argument("--clients", type=int, help=f"concurrent streaming clients (default {FULL['clients']})")
    ap.add_argument("--seconds", type=float, help=f"measured window per run (default {FULL['seconds']:.0f})")
    ap.add_argument("--ramp-s", type=float, help=f"unmeasured start of each run (default {FULL['ramp_s']:.0f})")
    ap.add_argument("--repeats", type=int, help=f"timed runs per side (default {FULL['repeats']})")
    ap.add_argument("--min-len", type=int, help=f"shortest prompt (default {FULL['min_len']})")
    ap.add_argument("--max-len", type=int, help=f"longest prompt (default {FULL['max_len']})")
    ap.add_argument("--min-new", type=int, help=f"smallest max_tokens (default {FULL['min_new']})")
    ap.add_argument("--max-new", type=int, help=f"largest max_tokens (default {FULL['max_new']})")
    ap.add_argument("--mix", type=int, default=64, help="requests in the mix (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="mix RNG seed")
    ap.add_argument("--preset", default="bench", help="checkpoint preset to serve (default bench)")
    ap.add_argument("--model", help="checkpoint folder instead of --preset (with --url: the one the app serves; "
                                    "default there: the embedded tiny model of `moe-serve up`)")
    ap.add_argument("--url", help="an app already running (http://host:port); default: start one here")
    ap.add_argument("--replica-cpus", type=int, default=1,
                    help="num_cpus of the Attention and each ExpertGroup replica; Ray gives each that many torch "
                         "threads (default 1, the app's default); bare-grpc's processes get as many")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="engine micro_batches on the disaggregated sides (served, bare-grpc; default 1)")
    ap.add_argument("--autoscale", action="store_true",
                    help="served side: leave expert autoscaling on (default off: one replica per group, the "
                         "bare-grpc layout)")
    ap.add_argument("--skip-bare", action="store_true", help="only the served side (and the check)")
    ap.add_argument("--skip-grpc", action="store_true", help="no bare-grpc side")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="no re-runs of contended runs once this many seconds have passed")
    ap.add_argument("--max-retries", type=int,
                    help=f"re-runs of one contended run, at most (default {FULL['max_retries']})")
    ap.add_argument("--quiet-wait-s", type=float,
                    help=f"before each run, wait up to this long for other processes to go quiet (0: never; "
                         f"default {FULL['quiet_wait_s']:.0f})")
    ap.add_argument("--out", default="app_load.json", help="file name under bench/out/")
    a = ap.parse_args()
    common.fill_defaults(a, QUICK, FULL)
    return a


# --- CPU accounting: our process tree against everything else ----------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, name) for every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()      # fields from the 3rd (state) on
        name = b" ".join(argv).decode(errors="replace").strip() or stat[stat.index("(") + 1:stat.rindex(")")]
        if b"expert_service" in argv:
            shard = argv[argv.index(b"--shard-id") + 1].decode() if b"--shard-id" in argv else "?"
            name = f"expert shard {shard}"
        out[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK, name)
    return out


def _tree(procs: dict[int, tuple[int, float, str]], root: int) -> dict[int, tuple[float, str]]:
    """root and its descendants: pid -> (CPU seconds, label)."""
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out[pid] = (procs[pid][1], _label(procs[pid][2], pid == root))
            todo += kids.get(pid, [])
    return out


def _label(raw: str, root: bool) -> str:
    """A short name: the deployment for a Serve replica, the actor for other Ray workers, else the program."""
    if root:
        return "this process"
    if raw.startswith("expert shard"):
        return raw
    if "ServeReplica:" in raw:                         # "ray::ServeReplica:<app>:Attention[.method]"
        return raw.split("ServeReplica:")[-1].split()[0].split(":")[-1].split(".")[0]
    if raw.startswith("ray::"):                        # "ray::ServeController[.method]", "ray::IDLE"
        return raw[5:].split()[0].split(".")[0]
    return raw.split()[0].rsplit("/", 1)[-1]            # raylet, gcs_server, python


class CpuMeter:
    """CPU of this process tree per label, and of every other process, between start and stop."""

    def start(self) -> None:
        self.t0, self.busy0 = time.perf_counter(), common._busy_cpu_s()
        self.tree0 = _tree(_procs(), os.getpid())

    def stop(self) -> dict:
        busy, tree = common._busy_cpu_s(), _tree(_procs(), os.getpid())
        wall = time.perf_counter() - self.t0
        by_label: dict[str, float] = {}
        for pid, (cpu, label) in tree.items():
            by_label[label] = by_label.get(label, 0.0) + cpu - self.tree0.get(pid, (0.0, ""))[0]
        ours = sum(by_label.values())
        return {"wall_s": wall, "ours_cpu_s": ours, "others_cpu_s": max(0.0, busy - self.busy0 - ours),
                "by_process": dict(sorted(by_label.items(), key=lambda kv: -kv[1]))}


    def others_now(self) -> tuple[float, float]:
        """(seconds since start, CPU seconds of other processes since start), cheaply: only the
        processes of our tree at start are read again."""
        ours = 0.0
        for pid, (cpu0, _) in self.tree0.items():
            cpu = _pid_cpu(pid)
            if cpu is not None:
                ours += cpu - cpu0
        return time.perf_counter() - self.t0, max(0.0, common._busy_cpu_s() - self.busy0 - ours)

    def contended_now(self, grace_s: float = 5.0) -> bool:
        """Other processes have taken more than CONTENDED_SHARE of a core over max(elapsed, grace_s)."""
        elapsed, others = self.others_now()
        return others > common.CONTENDED_SHARE * max(elapsed, grace_s)


def _pid_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(rest[11]) + int(rest[12])) / _TICK


def others_busy(window_s: float) -> float:
    """CPU seconds taken by processes outside our tree over the next window_s."""
    m = CpuMeter()
    m.start()
    time.sleep(window_s)
    return m.stop()["others_cpu_s"]


def wait_quiet(max_wait_s: float, window_s: float = 1.0) -> float:
    t0 = time.perf_counter()
    while max_wait_s > 0:
        if others_busy(window_s) < common.CONTENDED_SHARE * window_s or time.perf_counter() - t0 >= max_wait_s:
            break
    return time.perf_counter() - t0


# --- the load --------------------------------------------------------------------------
@dataclass
class Record:
    start: float
    max_tokens: int
    chunks: list[float] = field(default_factory=list)   # arrival of each chunk with text (or the finish)
    tokens: int = 0
    end: float = 0.0
    error: str | None = None


def make_mix(a, vocab: int) -> list[tuple[list[int], int]]:
    prompts = common.random_prompts(a.mix, a.min_len, a.max_len, vocab, a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)
    news = torch.randint(a.min_new, a.max_new + 1, (a.mix,), generator=g).tolist()
    return list(zip(prompts, news))


async def http_request(client, model: str, prompt: list[int], max_tokens: int) -> Record:
    r = Record(time.perf_counter(), max_tokens)
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                r.chunks.append(now)
            if chunk.usage is not None:
                r.tokens = chunk.usage.completion_tokens
    except Exception as e:                       # noqa: BLE001 - every failure is an error figure
        r.error = f"{type(e).__name__}: {e}"[:300]
    r.end = time.perf_counter()
    if r.error is None and (r.tokens != max_tokens or not r.chunks):
        r.error = f"{r.tokens} tokens in {len(r.chunks)} chunks, asked for {max_tokens}"
    return r


async def engine_request(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> Record:
    r = Record(time.perf_counter(), max_tokens)
    try:
        async for d in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
            # The HTTP side sends a chunk for exactly these deltas (cluster/api/openai_api.py).
            if d.text or d.finish_reason is not None:
                r.chunks.append(time.perf_counter())
            r.tokens += len(d.token_ids)
            if d.finish_reason == "error":
                r.error = d.error
    except Exception as e:                       # noqa: BLE001
        r.error = f"{type(e).__name__}: {e}"[:300]
    r.end = time.perf_counter()
    if r.error is None and r.tokens != max_tokens:
        r.error = f"{r.tokens} tokens, asked for {max_tokens}"
    return r


async def run_load(send, mix, clients: int, ramp_s: float, seconds: float, abort_if=None,
                   max_drain_s: float = 60.0) -> dict:
    """Closed-loop clients; -> the figures over the window [start + ramp_s, + seconds] and every record.

    abort_if() is polled twice a second: when it says so, every client is cancelled (their
    requests with them) and the run is marked aborted. Requests still running max_drain_s
    after the window are cancelled too."""
    t_begin = time.perf_counter()
    t0, t1 = t_begin + ramp_s, t_begin + ramp_s + seconds
    records: list[Record] = []

    async def client(i: int) -> None:
        k = i
        while time.perf_counter() < t1:
            prompt, n = mix[k % len(mix)]
            k += clients
            records.append(await send(prompt, n))

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    aborted = False

    async def watchdog() -> None:
        nonlocal aborted
        while True:
            await asyncio.sleep(0.5)
            if abort_if():
                aborted = True
                for t in tasks:
                    t.cancel()
                return

    dog = asyncio.create_task(watchdog()) if abort_if is not None else None
    _, pending = await asyncio.wait(tasks, timeout=ramp_s + seconds + max_drain_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if dog is not None:
        dog.cancel()
        await asyncio.gather(dog, return_exceptions=True)
    return summarize(records, t0, t1) | {"records": records, "wall_s": time.perf_counter() - t_begin,
                                         "aborted": aborted, "drain_cut": bool(pending) and not aborted}


def summarize(records: list[Record], t0: float, t1: float) -> dict:
    ok = [r for r in records if r.error is None]
    tokens_in = sum(r.tokens / len(r.chunks) * sum(t0 <= c < t1 for c in r.chunks) for r in ok)
    finished = sum(t0 <= r.end < t1 for r in ok)
    timed = [r for r in ok if t0 <= r.start < t1]
    return {"window_s": t1 - t0, "requests_per_s": finished / (t1 - t0), "tokens_per_s": tokens_in / (t1 - t0),
            "requests": len(records), "errors": len(records) - len(ok),
            "ttft_s": [r.chunks[0] - r.start for r in timed],
            "tpot_s": [(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in timed if r.tokens > 1],
            "output_tokens": sum(r.tokens for r in ok)}


def pct(xs: list[float], q: float) -> float:
    """q-th percentile, linear between closest ranks."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


class Runner:
    """Runs one side's timed runs: waits for a quiet machine, redoes contended runs within budget."""

    def __init__(self, a, t_start: float, judge_contention: bool = True):
        self.a, self.t_start, self.judge = a, t_start, judge_contention

    async def runs(self, side: str, send, mix) -> list[dict]:
        """--repeats completed runs (plus any stopped or contended attempts, marked as such)."""
        a, out = self.a, []
        for rep in range(a.repeats):
            for attempt in range(a.max_retries + 1):
                last = attempt == a.max_retries or time.perf_counter() - self.t_start > a.budget_s
                if a.quiet_wait_s > 0:          # a retry waits longer: what stopped the last try may go on
                    await asyncio.to_thread(wait_quiet, a.quiet_wait_s * (3 if attempt else 1))
                meter = CpuMeter()
                meter.start()
                # A run that other processes slow down is stopped early, unless it is the last try.
                res = await run_load(send, mix, a.clients, a.ramp_s, a.seconds,
                                     abort_if=meter.contended_now if self.judge and not last else None)
                res["cpu"] = cpu = meter.stop()
                res["contended"] = res["aborted"] or (
                    self.judge and cpu["others_cpu_s"] > common.CONTENDED_SHARE * cpu["wall_s"])
                res["repeat"], res["attempt"] = rep + 1, attempt + 1
                out.append(res)
                if res["aborted"]:
                    print(f"  run {side} {rep + 1}: stopped after {res['wall_s']:.1f} s, other processes took "
                          f"{cpu['others_cpu_s']:.1f} CPU-s; redoing it", flush=True)
                    continue
                note = f" CONTENDED (others took {cpu['others_cpu_s']:.1f} CPU-s)" if res["contended"] else ""
                cut = "; DRAIN CUT: requests still running were cancelled" if res["drain_cut"] else ""
                print(f"  run {side} {rep + 1}: {res['tokens_per_s']:.1f} tokens/s, {res['requests_per_s']:.2f} req/s, "
                      f"{res['requests']} requests, {res['errors']} errors, {res['wall_s']:.1f} s, "
                      f"CPU ours {cpu['ours_cpu_s']:.1f} s / others {cpu['others_cpu_s']:.1f} s{note}{cut}", flush=True)
                if not res["contended"] or last:
                    break
        return out


def side_figures(runs: list[dict]) -> dict:
    done = [r for r in runs if not r["aborted"]]
    clean = [r for r in done if not r["contended"]]
    use = clean or done
    ttft = [x for r in use for x in r["ttft_s"]]
    tpot = [x for r in use for x in r["tpot_s"]]
    tok = sum(r["output_tokens"] for r in use)
    cpu: dict[str, float] = {}
    for r in use:
        for k, v in r["cpu"]["by_process"].items():
            cpu[k] = cpu.get(k, 0.0) + v
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in use),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in use),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
            "timed_requests": len(ttft), "errors": sum(r["errors"] for r in runs),
            "runs_in_median": len(use), "uncontended": bool(clean),
            "cores_busy": sum(r["cpu"]["ours_cpu_s"] for r in use) / sum(r["cpu"]["wall_s"] for r in use),
            "cpu_ms_per_token": {k: 1e3 * v / tok for k, v in cpu.items() if 1e3 * v / tok >= 0.05}}


def report(side: str, f: dict) -> None:
    tag = "" if f["uncontended"] else " (contended: other processes were busy)"
    runs = f"median of {f['runs_in_median']} runs"
    print(f"app_load {side} requests_per_s={f['requests_per_s']:.2f} ({runs}){tag}")
    print(f"app_load {side} output_tokens_per_s={f['tokens_per_s']:.1f} ({runs}){tag}")
    print(f"app_load {side} ttft_p50_ms={f['ttft_p50_ms']:.0f} ttft_p99_ms={f['ttft_p99_ms']:.0f} "
          f"(over {f['timed_requests']} requests)")
    print(f"app_load {side} tpot_p50_ms={f['tpot_p50_ms']:.1f} tpot_p99_ms={f['tpot_p99_ms']:.1f}")
    print(f"app_load {side} errors={f['errors']}")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in f["cpu_ms_per_token"].items())
    print(f"app_load {side} cpu_ms_per_output_token: {parts} (cores busy {f['cores_busy']:.2f})", flush=True)


async def warm_up(send, mix, clients: int) -> list[Record]:
    return list(await asyncio.gather(*(send(mix[i % len(mix)][0], 4) for i in range(clients))))


# --- the sides ---------------------------------------------------------------------------
async def served_side(a, url: str, mix, reference, tok, runner: Runner) -> tuple[list[dict], dict, list[Record]]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        model = (await client.models.list()).data[0].id
        check = {"model_name": model, "requests": []}
        for prompt, expected in reference:
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=CHECK_TOKENS, temperature=0,
                                                logprobs=0, extra_body={"ignore_eos": True})
            got = r.choices[0].logprobs.tokens
            want = [token_text(tok, t) for t in expected]
            ctx = prompt[-6:]
            want_text = tok.decode(ctx + expected)[len(tok.decode(ctx)):]
            check["requests"].append({"prompt_len": len(prompt), "tokens_equal": got == want,
                                      "text_equal": r.choices[0].text == want_text,
                                      "completion_tokens": r.usage.completion_tokens})
        check["ok"] = all(c["tokens_equal"] and c["text_equal"] and c["completion_tokens"] == CHECK_TOKENS
                          for c in check["requests"])
        send = lambda p, n: http_request(client, model, p, n)  # noqa: E731
        warm = await warm_up(send, mix, a.clients)
        return await runner.runs("served", send, mix), check, warm
    finally:
        await client.close()


async def bare_side(a, engine, tok, mix, runner: Runner, side: str) -> tuple[list[dict], list[Record]]:
    aeng = AsyncEngine(engine, tok)            # its loop binds to this event loop
    send = lambda p, n: engine_request(aeng, p, n)  # noqa: E731
    warm = await warm_up(send, mix, a.clients)
    try:
        return await runner.runs(side, send, mix), warm
    finally:
        if aeng._task is not None:
            aeng._task.cancel()
            await asyncio.gather(aeng._task, return_exceptions=True)


async def grpc_side(a, ckpt, mix, runner: Runner, addresses: list[str]) -> tuple[list[dict], list[Record]]:
    engine, tok = await connect_engine(ckpt, addresses, EngineConfig(micro_batches=a.micro_batches))
    try:
        return await bare_side(a, engine, tok, mix, runner, "bare-grpc")
    finally:
        await engine.close()


def errors_of(warm: list[Record]) -> int:
    return sum(r.error is not None for r in warm)


def main() -> int:
    a = parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    t_start = time.perf_counter()

    if a.model:
        ckpt = Path(a.model)
    elif a.url:
        from cluster.serve.app_config import default_model
        ckpt = default_model()
    else:
        ckpt = common.checkpoint(a.preset)
    mc = load_model_config(ckpt)
    mix = make_mix(a, mc.vocab_size)
    machine = common.announce_machine("app_load")
    print(f"app_load model: {ckpt} (hidden {mc.hidden_size}, {mc.num_hidden_layers} layers, "
          f"{mc.num_local_experts} experts top-{mc.num_experts_per_tok}, vocab {mc.vocab_size})")
    print(f"app_load workload: clients={a.clients} window_s={a.seconds:g} ramp_s={a.ramp_s:g} repeats={a.repeats} "
          f"mix={len(mix)} prompt_lens={a.min_len}-{a.max_len} max_tokens={a.min_new}-{a.max_new} greedy ignore_eos",
          flush=True)

    # The reference for the check, from the bare engine (every expert in this process).
    engine, tok = build_engine(ckpt, EngineConfig())
    check_prompts = [p for p, _ in mix[:CHECK_PROMPTS]]
    seqs = asyncio.run(engine.generate(check_prompts, SamplingParams(max_tokens=CHECK_TOKENS, temperature=0,
                                                                      ignore_eos=True)))
    reference = [(p, s.output_ids) for p, s in zip(check_prompts, seqs)]
    # Fresh KV blocks after the reference batch: none should be left held.
    assert engine.blocks_all_free

    runs: dict[str, list[dict]] = {}
    warm_errors: dict[str, int] = {}
    app_info: dict = {}
    runner = Runner(a, t_start, judge_contention=not a.url)

    # served
    t = time.perf_counter()
    if a.url:
        runs["served"], check, warm = asyncio.run(served_side(a, a.url.rstrip("/"), mix, reference, tok, runner))
        app_info = {"url": a.url, "started_here": False}
    else:
        from cluster.tools.harness import running_app

        groups = [{"experts": e, "num_cpus": a.replica_cpus} for e in split_experts(mc.num_local_experts, GROUPS)]
        attention = {"num_cpus": a.replica_cpus, "engine": {"micro_batches": a.micro_batches}}
        # One replica per group, as bare-grpc has: the ratio is the cost of Serve and HTTP on the
        # same processes. (Under this load the default policy would add expert replicas, which on
        # two shared cores only split the same cores further.)
        with running_app(ckpt, attention=attention, expert_groups=groups,
                         autoscaling={"enabled": a.autoscale}) as (cfg, url, _):
            app_info = {"started_here": True, "setup_s": time.perf_counter() - t, "groups": cfg.groups,
                        "attention": {"replicas": cfg.attention.replicas, "num_cpus": cfg.attention.num_cpus}}
            print(f"app_load app up in {app_info['setup_s']:.1f} s at {url}", flush=True)
            runs["served"], check, warm = asyncio.run(served_side(a, url, mix, reference, tok, runner))
            # Said, so that a figure taken with --autoscale shows the layout it ran on.
            from ray import serve

            app_info["expert_replicas"] = {
                name: d.replica_states.get("RUNNING", 0)
                for name, d in serve.status().applications[cfg.name].deployments.items()
                if name.startswith("ExpertGroup-")}
            print("app_load served expert replicas at the end: "
                  + ", ".join(f"{n} {c}" for n, c in sorted(app_info["expert_replicas"].items())), flush=True)
        t = time.perf_counter()
    warm_errors["served"] = errors_of(warm)

    # bare, in-process experts
    if not a.skip_bare:
        runs["bare"], warm = asyncio.run(bare_side(a, engine, tok, mix, runner, "bare"))
        warm_errors["bare"] = errors_of(warm)
        blocks_ok = engine.blocks_all_free
        del engine
        if not a.skip_grpc:
            from expert_service.launcher import start_shards, stop_shards

            shards = start_shards(ckpt, split_experts(mc.num_local_experts, GROUPS),
                                  env={"OMP_NUM_THREADS": str(a.replica_cpus)})
            threads = torch.get_num_threads()
            torch.set_num_threads(a.replica_cpus)   # as in the Attention replica (Ray: OMP_NUM_THREADS = num_cpus)
            try:
                runs["bare-grpc"], warm = asyncio.run(grpc_side(a, ckpt, mix, runner, [s.address for s in shards]))
                warm_errors["bare-grpc"] = errors_of(warm)
            finally:
                torch.set_num_threads(threads)
                stop_shards(shards)
    else:
        blocks_ok = True

    figs = {side: side_figures(r) for side, r in runs.items()}
    for side in SIDES:
        if side in figs:
            report(side, figs[side])
    ratio = split_d = split_s = None

    def ctag(*sides: str) -> str:
        bad = [x for x in sides if not figs[x]["uncontended"]]
        return f" (from contended runs of {', '.join(bad)})" if bad else ""

    if "bare-grpc" in figs:
        split_s = figs["served"]["tokens_per_s"] / figs["bare-grpc"]["tokens_per_s"]
        print(f"app_load ratio serve_and_http served/bare-grpc output_tokens_per_s={split_s:.2f} (target >= "
              f"{TARGET_RATIO}: {'met' if split_s >= TARGET_RATIO else 'NOT met'}){ctag('served', 'bare-grpc')}")
    if "bare" in figs:
        ratio = figs["served"]["tokens_per_s"] / figs["bare"]["tokens_per_s"]
        print(f"app_load info served/bare output_tokens_per_s={ratio:.2f}{ctag('served', 'bare')}")
    if "bare-grpc" in figs:
        split_d = figs["bare-grpc"]["tokens_per_s"] / figs["bare"]["tokens_per_s"]
        print(f"app_load info disaggregation bare-grpc/bare={split_d:.2f}{ctag('bare-grpc', 'bare')}")
    all_runs = [r for rr in runs.values() for r in rr]
    contended = sum(r["contended"] for r in all_runs)
    if contended:
        print(f"app_load WARNING: {contended} of {len(all_runs)} runs shared the CPU with other processes "
              f"(left out of the medians where a clean run exists; all in the JSON)")
    errors = sum(f["errors"] for f in figs.values()) + sum(warm_errors.values())
    ok = check["ok"] and errors == 0 and blocks_ok
    detail = "; ".join(f"prompt of {c['prompt_len']}: tokens {'=' if c['tokens_equal'] else '!='}, "
                       f"text {'=' if c['text_equal'] else '!='}" for c in check["requests"])
    print(f"CHECK {'OK' if ok else 'FAIL'}: {len(reference)} greedy requests of {CHECK_TOKENS} tokens through the app "
          f"vs the in-process engine: {detail}; errors under load: {errors}; KV blocks returned: {blocks_ok}")
    for side, rr in runs.items():
        for r in rr:
            for rec in r["records"]:
                if rec.error:
                    print(f"  error ({side}): {rec.error}")
                    break
    total_s = time.perf_counter() - t_start
    print(f"app_load total_s={total_s:.0f}")

    def slim(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ("records", "ttft_s", "tpot_s")} | {
            "errors_seen": sorted({rec.error for rec in r["records"] if rec.error})[:5]}
    path = common.write_json(a.out, {
        "benchmark": "app_load", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine,
        "checkpoint": str(ckpt), "model": {"hidden": mc.hidden_size, "layers": mc.num_hidden_layers,
                                           "experts": mc.num_local_experts, "top_k": mc.num_experts_per_tok,
                                           "vocab": mc.vocab_size},
        "workload": {"clients": a.clients, "window_s": a.seconds, "ramp_s": a.ramp_s, "repeats": a.repeats,
                     "mix": [{"prompt_len": len(p), "max_tokens": n} for p, n in mix], "seed": a.seed,
                     "greedy": True, "ignore_eos": True},
        "app": app_info, "figures": figs, "runs": {side: [slim(r) for r in rr] for side, rr in runs.items()},
        "warm_up_errors": warm_errors, "ratio_served_over_bare_grpc": split_s, "target_ratio": TARGET_RATIO,
        "ratio_served_over_bare": ratio,
        "split": {"disaggregation_bare_grpc_over_bare": split_d, "serve_http_served_over_bare_grpc": split_s},
        "check": check | {"ok": ok, "errors_under_load": errors, "kv_blocks_all_returned": blocks_ok},
        "contended_runs": contended, "total_s": total_s,
    })
    print(f"app_load wrote {path.relative_to(common.REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
