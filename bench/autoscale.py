"""Autoscaling under a skewed routing load, on the live app.

    .venv/bin/python -m bench.autoscale            # about 3 minutes on 2 CPU cores

The checkpoint's routers favour experts 0, 2, 4, 6 (`make-checkpoint --favour-experts`),
so most routed pairs go to group 0 of two round-robin groups. The app runs as `moe-serve
up` deploys it, with expert autoscaling on (group bounds 1..--max-replicas, target
--target pairs/s per replica). N closed-loop streaming clients (the `openai` client) load
it; the front door's /metrics is scraped every half second.

Figures (one line each):
- imbalance before / after: the busiest expert replica's load over the mean expert replica
  load, load being the (token, expert) pairs it computed per second
  (`moe_serve_expert_pairs_total` per replica; the unit the policy's target is in; a row
  carries one or two of a group's experts, so rows would not do), over the replicas serving
  at the end of the window. Rows/s and busy fraction per replica are printed beside it
  (on the tiny model a batch's compute is mostly fixed cost, so busy time follows the
  number of RPCs more than the work in them). "Before" is a window after the load starts and before the
  policy may act (its
  upscale delay); "after" is a window once the replica counts have been steady for a while.
  Target after: <= 1.25.
- time from the load change to the policy's decision (target gauge), to the new replica
  running, and to it serving rows.
- p99 TPOT of requests started in each window, and their ratio.
- time from the load stopping to the busy group being back at its minimum.
CHECK: no request failed, and a greedy request through the app gave the in-process engine's tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from bench import common  # noqa: E402
from bench.app_load import Record, http_request, pct  # noqa: E402
from cluster.observe.metrics_gather import parse, samples  # noqa: E402

TARGET_IMBALANCE = 1.25


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=6, help="concurrent streaming clients (default 6)")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per request (default 48)")
    ap.add_argument("--favour", type=float, default=0.4, help="router skew toward group 0 (default 0.4: ~85%%)")
    ap.add_argument("--target", type=float, default=400.0, help="target pairs/s per expert replica (default 400)")
    ap.add_argument("--max-replicas", type=int, default=4, help="expert group max replicas (default 4)")
    ap.add_argument("--upscale-delay", type=float, default=8.0, help="policy upscale delay, s (default 8)")
    ap.add_argument("--downscale-delay", type=float, default=10.0, help="policy downscale delay, s (default 10)")
    ap.add_argument("--steady-s", type=float, default=20.0, help="the 'after' window, s (default 20)")
    ap.add_argument("--out", default="autoscale.json", help="file name under bench/out/")
    return ap.parse_args()


class Scraper:
    """The front door's /metrics every half second: per-replica rows and the replica gauges."""

    def __init__(self, url: str):
        # (t, {replica: rows}, {group: {state: n}}, {replica: busy s}, {replica: pairs})
        self.url, self.series = url, []

    def scrape(self) -> None:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            f = parse(r.read().decode())
        rows, groups, busy, pairs = {}, {}, {}, {}
        for s in samples(f, "moe_serve_expert_pairs_total"):
            pairs[s.labels["replica"]] = s.value
        for s in samples(f, "moe_serve_expert_batch_rows_sum"):
            rows[s.labels["replica"]] = rows.get(s.labels["replica"], 0.0) + s.value
        for s in samples(f, "moe_serve_expert_busy_time_seconds_total"):
            busy[s.labels["replica"]] = s.value
        for s in samples(f, "moe_serve_expert_replicas"):
            groups.setdefault(s.labels["group"], {})[s.labels["state"]] = int(s.value)
        self.series.append((time.perf_counter(), rows, groups, busy, pairs))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.scrape)
            await asyncio.sleep(0.5)

    def window(self, t0: float, t1: float, field: int = 1) -> dict[str, float]:
        """Per replica, the rate of a cumulative series over [t0, t1] (nearest scrapes):
        field 1 rows/s, 3 busy fraction, 4 pairs/s. Replicas gone by t1 are left out."""
        a = min(self.series, key=lambda x: abs(x[0] - t0))
        b = min(self.series, key=lambda x: abs(x[0] - t1))
        dt = max(b[0] - a[0], 1e-6)
        return {r: (n - a[field].get(r, 0.0)) / dt for r, n in b[field].items()}

    def first(self, pred) -> float | None:
        """The first scrape time at which pred(rows, groups) holds."""
        return next((t for t, rows, groups, *_ in self.series if pred(rows, groups)), None)


def imbalance(rates: dict[str, float]) -> float:
    loads = [v for v in rates.values() if v > 0] or [0.0]
    return max(loads) / (sum(loads) / len(loads)) if sum(loads) else float("nan")


async def load(url: str, model: str, a, stop: asyncio.Event) -> list[Record]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    records: list[Record] = []

    async def one(i: int) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            prompt = [1] + [(i * 7919 + k * 104729 + j * 31) % 31000 + 100 for j in range(24)]
            records.append(await http_request(client, model, prompt, a.max_tokens))

    await asyncio.gather(*(one(i) for i in range(a.clients)))
    return records


def tpot_p99(records: list[Record], t0: float, t1: float) -> float:
    xs = [(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in records
          if r.error is None and t0 <= r.start < t1 and r.tokens > 1]
    return pct(xs, 99)


async def main_async(a, url: str, model: str) -> dict:
    sc = Scraper(url)
    stop_scrape, stop_load = asyncio.Event(), asyncio.Event()
    scraper = asyncio.create_task(sc.run(stop_scrape))
    await asyncio.sleep(2)
    t_load = time.perf_counter()
    loader = asyncio.create_task(load(url, model, a, stop_load))
    group0 = lambda rows, groups: groups.get("0", {})   # noqa: E731
    # Wait for the policy to act, then for the counts to settle, then measure "after".
    while sc.first(lambda rows, groups: group0(rows, groups).get("target", 1) > 1) is None:
        if time.perf_counter() - t_load > 120:
            raise RuntimeError("the policy did not scale group 0 up within 120 s")
        await asyncio.sleep(0.5)
    t_decided = sc.first(lambda rows, groups: group0(rows, groups).get("target", 1) > 1)
    # Steady: group 0's current and target counts and the set of expert replicas reporting
    # work all unchanged for 8 s (a replica that restarts shows as a new address).
    last_change = time.perf_counter()
    seen = None
    while time.perf_counter() - last_change < 8:
        _, _, groups, _, pairs = sc.series[-1]
        now = (groups.get("0", {}).get("current"), groups.get("0", {}).get("target"), frozenset(pairs))
        if now != seen:
            seen, last_change = now, time.perf_counter()
        await asyncio.sleep(0.5)
    t_after0 = time.perf_counter()
    await asyncio.sleep(a.steady_s)
    t_after1 = time.perf_counter()
    stop_load.set()
    records = await loader
    t_stop = time.perf_counter()
    while sc.series[-1][2].get("0", {}).get("current", 1) > 1 and time.perf_counter() - t_stop < 120:
        await asyncio.sleep(0.5)
    t_down = time.perf_counter()
    stop_scrape.set()
    await scraper

    before = (t_load + 2, t_load + min(a.upscale_delay, 8) - 0.5)
    early = min(sc.series, key=lambda x: abs(x[0] - before[1]))[1]
    first_reps = {r for r, n in early.items() if n > 0}
    t_serving = sc.first(lambda rows, groups: any(r not in first_reps and n > 0 for r, n in rows.items()))
    t_running = sc.first(lambda rows, groups: group0(rows, groups).get("current", 1) > 1)
    rb, ra = sc.window(*before), sc.window(t_after0, t_after1)
    bb, ba = sc.window(*before, field=3), sc.window(t_after0, t_after1, field=3)
    pb, pa = sc.window(*before, field=4), sc.window(t_after0, t_after1, field=4)
    return {
        "imbalance_before": imbalance(pb), "imbalance_after": imbalance(pa),
        "pairs_per_s_before": pb, "pairs_per_s_after": pa,
        "busy_before": bb, "busy_after": ba, "rows_per_s_before": rb, "rows_per_s_after": ra,
        "replicas_after": min(sc.series, key=lambda x: abs(x[0] - t_after1))[2],
        "decision_s": t_decided - t_load, "running_s": (t_running or float("nan")) - t_load,
        "serving_s": (t_serving or float("nan")) - t_load, "scale_down_s": t_down - t_stop,
        "back_to_min": sc.series[-1][2].get("0", {}).get("current") == 1,
        "tpot_p99_before_s": tpot_p99(records, *before), "tpot_p99_after_s": tpot_p99(records, t_after0, t_after1),
        "requests": len(records), "errors": [r.error for r in records if r.error][:5],
        "num_errors": sum(r.error is not None for r in records),
    }


def main() -> int:
    a = parse_args()
    import openai
    import ray
    from ray import serve

    from attention_service.config import EngineConfig
    from attention_service.sampling_params import SamplingParams
    from cluster.local import build_engine
    from cluster.serve import app_config
    from cluster.serve.builder import deploy
    from mixtral.config import preset
    from mixtral.random_checkpoint import write_random_checkpoint

    t_start = time.perf_counter()
    ckpt = common.CACHE_DIR / f"tiny-favour-{a.favour}"
    if not (ckpt / "config.json").exists():
        write_random_checkpoint(preset("tiny"), ckpt, favour_experts=[0, 2, 4, 6], favour=a.favour)
    cfg = app_config.decode({
        "model": str(ckpt), "groups": 2,
        "autoscaling": {"experts": {"min_replicas": 1, "max_replicas": a.max_replicas, "target_tokens_per_s": a.target,
                                    "upscale_delay_s": a.upscale_delay, "downscale_delay_s": a.downscale_delay,
                                    "max_busy": 1.0},
                        "metrics_interval_s": 0.5, "look_back_period_s": 2}})
    ray.init(_node_ip_address="127.0.0.1", num_cpus=16, include_dashboard=False, namespace="moe-serve",
             log_to_driver=False)
    try:
        deploy(cfg, str(ckpt))
        url = f"http://127.0.0.1:{cfg.http_port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        prompt = [1, 415, 5565, 302, 4843]
        served = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text
        fig = asyncio.run(main_async(a, url, model))
        # Replicas set aside after a failed RPC would take fewer rows: say how many there were.
        fig["attention_load"] = serve.get_deployment_handle("Attention", app_name=cfg.name).load.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    engine, tok = build_engine(ckpt, EngineConfig(), 2)
    (seq,) = asyncio.run(engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))
    ctx = prompt[-6:]              # the front door decodes with the prompt's end as context
    same = served == tok.decode(ctx + seq.output_ids)[len(tok.decode(ctx)):]
    ok = same and fig["num_errors"] == 0 and fig["back_to_min"]

    ms = lambda s: f"{s * 1000:.1f}"   # noqa: E731
    print(f"autoscale imbalance_before={fig['imbalance_before']:.2f} (busiest expert replica / mean, pairs/s)")
    print(f"autoscale imbalance_after={fig['imbalance_after']:.2f} (target <= {TARGET_IMBALANCE}: "
          f"{'met' if fig['imbalance_after'] <= TARGET_IMBALANCE else 'NOT met'})")
    print(f"autoscale pairs_per_s_before={ {k: round(v, 1) for k, v in fig['pairs_per_s_before'].items()} }")
    print(f"autoscale pairs_per_s_after={ {k: round(v, 1) for k, v in fig['pairs_per_s_after'].items()} }")
    print(f"autoscale busy_before={ {k: round(v, 4) for k, v in fig['busy_before'].items()} }")
    print(f"autoscale busy_after={ {k: round(v, 4) for k, v in fig['busy_after'].items()} }")
    print(f"autoscale rows_per_s_before={ {k: round(v, 1) for k, v in fig['rows_per_s_before'].items()} }")
    print(f"autoscale rows_per_s_after={ {k: round(v, 1) for k, v in fig['rows_per_s_after'].items()} }")
    print(f"autoscale time_to_decision_s={fig['decision_s']:.1f} (upscale delay {a.upscale_delay:.0f} s)")
    print(f"autoscale time_to_replica_running_s={fig['running_s']:.1f}")
    print(f"autoscale time_to_new_replica_serving_s={fig['serving_s']:.1f}")
    print(f"autoscale tpot_p99_ms before={ms(fig['tpot_p99_before_s'])} after={ms(fig['tpot_p99_after_s'])} "
          f"ratio={fig['tpot_p99_after_s'] / fig['tpot_p99_before_s']:.2f}")
    print(f"autoscale time_to_scale_down_s={fig['scale_down_s']:.1f} (downscale delay {a.downscale_delay:.0f} s)")
    print(f"autoscale replicas_after={fig['replicas_after']}")
    print(f"autoscale requests={fig['requests']} errors={fig['num_errors']} "
          f"expert_rpc_failovers={fig['attention_load']['failovers']}")
    print(f"CHECK {'OK' if ok else 'FAIL'}: served tokens equal the in-process engine's: {same}; "
          f"errors: {fig['num_errors']}; back to min: {fig['back_to_min']}")
    fig.update(args=vars(a), machine=common.machine(), check=ok, total_s=time.perf_counter() - t_start)
    print(f"autoscale wrote {common.write_json(a.out, fig)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
