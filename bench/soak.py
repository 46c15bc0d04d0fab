"""Soak: streaming clients for minutes while replicas are killed on a schedule.

    python -m bench.soak [--clients 8] [--minutes 10] [--kill-every 60]

Deploys the app on a local Ray cluster (the tiny model on CPU; expert group 0 with two
replicas, group 1 with one; API key on) and runs `--clients` streaming clients, each
sending greedy requests from a fixed set of prompts, one after another, the way a real
client would: a 429 or 503 waits its Retry-After. After a first quiet interval (the
baseline), every `--kill-every` seconds one process is SIGKILLed, in turn: one of group
0's two replicas, group 1's only replica, the Attention replica.

Prints one line per figure: requests completed and failed by cause, greedy mismatches
against the in-process engine (target 0), each kill's recovery (until /ready is 200 and
a request succeeds again), completed requests per second under faults / in the quiet
baseline, and each process's resident memory at start and end (a replica that was killed
and replaced shows its successor). Writes the same to bench/out/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai

from bench.app_load import _label, _procs, _tree
from bench.common import OUT_DIR

KEY = "soak-key"
PROMPTS = [[1] + list(range(1000 + 37 * i, 1000 + 37 * i + 4 + 3 * i)) for i in range(12)]
MAX_TOKENS = 48
KILLS = [("ExpertGroup-0", "one of group 0's two replicas"), ("ExpertGroup-1", "group 1's only replica"),
         ("Attention", "the Attention replica")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default: 10)")
    p.add_argument("--kill-every", type=float, default=60.0, metavar="S",
                   help="seconds between kills; the first comes after one quiet interval (default: 60)")
    p.add_argument("--out", default=str(OUT_DIR / "soak.json"))
    return p.parse_args(argv)


def rss_by_process() -> dict[str, float]:
    """label -> resident MiB, for this process tree (Ray's processes included)."""
    out: dict[str, float] = {}
    for pid, (_, label) in _tree(_procs(), os.getpid()).items():
        try:
            with open(f"/proc/{pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        if label in ("this process", "IDLE") or label.startswith(("raylet", "gcs_server", "bash", "sh")):
            continue
        n = sum(1 for k in out if k == label or k.startswith(label + " #"))
        out[label if n == 0 else f"{label} #{n + 1}"] = round(kib / 1024, 1)
    return out


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Soak:
    def __init__(self, url: str, model: str, reference: dict[tuple, str]):
        self.url, self.model, self.reference = url, model, reference
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        self.done: list[float] = []                          # completion times
        self.failed: collections.Counter = collections.Counter()
        self.mismatches = 0
        self.stop = False

    async def one(self, prompt: list[int]) -> float:
        """One streamed request; -> seconds to wait before the next (a refusal's Retry-After)."""
        try:
            stream = await self.client.completions.create(model=self.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                          temperature=0, stream=True, extra_body={"ignore_eos": True})
            text = []
            async for c in stream:
                if c.choices:
                    text.append(c.choices[0].text)
        except openai.APIStatusError as e:
            code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            self.failed[f"HTTP {e.status_code} {code or ''}".strip()] += 1
            return float(e.response.headers.get("retry-after", 1))
        except openai.APIError as e:                         # an error event inside the stream
            code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            self.failed[f"stream broken: {code or e.message}"] += 1
            return 1.0
        except Exception as e:
            self.failed[f"{type(e).__name__}"] += 1
            return 1.0
        self.done.append(time.monotonic())
        if "".join(text) != self.reference[tuple(prompt)]:
            self.mismatches += 1
        return 0.0

    async def client_loop(self, i: int) -> None:
        k = i
        while not self.stop:
            wait = await self.one(PROMPTS[k % len(PROMPTS)])
            k += 1
            if wait:
                await asyncio.sleep(wait)

    async def recovered(self, since: float) -> float:
        """Seconds from since until /ready is 200 and a request succeeds."""
        while True:
            if await asyncio.to_thread(ready, self.url):
                n = len(self.done)
                await self.one(PROMPTS[0])
                if len(self.done) > n:
                    return time.monotonic() - since
            await asyncio.sleep(0.5)


def kill_replica(deployment: str) -> int:
    """SIGKILL a replica process of the deployment (a crash, not a graceful stop); -> its pid."""
    procs = _procs()
    pid = next(pid for pid, (_, _, name) in procs.items()
               if "ServeReplica:" in name and _label(name, False) == deployment)
    os.kill(pid, signal.SIGKILL)
    return pid


async def soak(a, url: str, model: str, reference: dict) -> dict:
    s = Soak(url, model, reference)
    t0 = time.monotonic()
    clients = [asyncio.ensure_future(s.client_loop(i)) for i in range(a.clients)]
    kills, rss_start = [], None
    await asyncio.sleep(min(10.0, a.kill_every / 2))
    rss_start = await asyncio.to_thread(rss_by_process)
    await asyncio.sleep(max(0.0, t0 + a.kill_every - time.monotonic()))
    baseline = sum(1 for t in s.done if t >= t0 + 10) / max(1e-9, a.kill_every - 10)
    k = 0
    end = t0 + a.minutes * 60
    while time.monotonic() + 5 < end:
        deployment, what = KILLS[k % len(KILLS)]
        failed_before = sum(s.failed.values())
        at = time.monotonic()
        pid = await asyncio.to_thread(kill_replica, deployment)
        rec = await s.recovered(at)
        kills.append({"t_s": round(at - t0, 1), "killed": what, "pid": pid, "recovered_s": round(rec, 1),
                      "failed_meanwhile": sum(s.failed.values()) - failed_before})
        k += 1
        await asyncio.sleep(max(0.0, min(end, at + a.kill_every) - time.monotonic()))
    s.stop = True
    await asyncio.gather(*clients)
    t1 = time.monotonic()
    rss_end = await asyncio.to_thread(rss_by_process)
    faulted = sum(1 for t in s.done if t >= t0 + a.kill_every) / max(1e-9, t1 - t0 - a.kill_every)
    await s.client.close()
    return {"clients": a.clients, "seconds": round(t1 - t0), "completed": len(s.done), "failed": dict(s.failed),
            "mismatches": s.mismatches, "kills": kills, "baseline_rps": round(baseline, 2),
            "faulted_rps": round(faulted, 2), "rss_mib_start": rss_start, "rss_mib_end": rss_end}


def main(argv=None) -> None:
    a = parse_args(argv)
    from attention_service.sampling_params import SamplingParams
    from cluster.local import build_engine
    from cluster.serve.app_config import default_model
    from cluster.tools.harness import running_app

    ckpt = default_model()
    engine, tok = build_engine(ckpt)
    seqs = asyncio.run(engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                               ignore_eos=True)))
    reference = {tuple(p): tok.decode(p[-6:] + s.output_ids)[len(tok.decode(p[-6:])):] for p, s in zip(PROMPTS, seqs)}
    del engine
    config = dict(api_keys=[KEY], autoscaling={"enabled": False},
                  attention={"expert_wait_s": 90, "max_ongoing_requests": 64},
                  expert_groups=[{"experts": [0, 2, 4, 6], "replicas": 2}, {"experts": [1, 3, 5, 7]}])
    with running_app(ckpt, **config) as (_, url, _):
        r = asyncio.run(soak(a, url, ckpt.name, reference))
    print(f"clients {r['clients']}, {r['seconds']} s, a kill every {a.kill_every:.0f} s after a quiet first interval")
    print(f"requests completed: {r['completed']}")
    print(f"requests failed: {sum(r['failed'].values())}" +
          "".join(f"; {n} x {cause}" for cause, n in sorted(r["failed"].items())))
    print(f"greedy mismatches against the in-process engine: {r['mismatches']} (target 0)")
    for k in r["kills"]:
        print(f"kill at {k['t_s']:.0f} s, {k['killed']}: serving again after {k['recovered_s']:.1f} s, "
              f"{k['failed_meanwhile']} requests failed meanwhile")
    ratio = r["faulted_rps"] / r["baseline_rps"] if r["baseline_rps"] else float("nan")
    print(f"completed requests/s under faults {r['faulted_rps']:.2f} / quiet baseline {r['baseline_rps']:.2f} "
          f"= {ratio:.2f}")
    for label in sorted(set(r["rss_mib_start"]) | set(r["rss_mib_end"])):
        print(f"RSS {label}: {r['rss_mib_start'].get(label, '-')} -> {r['rss_mib_end'].get(label, '-')} MiB")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
