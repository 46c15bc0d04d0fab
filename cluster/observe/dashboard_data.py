"""What the built-in /dashboard page shows, computed from gathered /metrics samples.

`summarize` is a pure function of two gathers (now and an earlier one) and the autoscaling
policy's last report, so it is tested on real exposition text without a server. Rates come
from the difference of cumulative counters between the two gathers; latency quantiles are
estimated from cumulative histogram buckets the way Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

from prometheus_client.samples import Sample

from cluster.observe.metrics_gather import Family
from cluster.observe.names import ATTENTION, GROUP_PREFIX

Index = dict[str, list[Sample]]          # series name (e.g. `..._bucket`) -> its samples


def index(families: dict[str, Family]) -> Index:
    out: Index = defaultdict(list)
    for f in families.values():
        for s in f.samples:
            out[s.name].append(s)
    return out


def _key(s: Sample) -> tuple:
    return tuple(sorted(s.labels.items()))


def increase(cur: Iterable[Sample], before: Iterable[Sample], new_counts=lambda labels: False) -> dict[tuple, float]:
    """Per series (its sorted labels): growth of a cumulative series from `before` to `cur`.

    A counter that went down was restarted, so all of its value is new. A series `before`
    lacks counts whole only where new_counts(its labels) says so; elsewhere its total
    predates the window."""
    was = {_key(s): s.value for s in before}
    out = {}
    for s in cur:
        k = _key(s)
        if k in was:
            out[k] = s.value - was[k] if s.value >= was[k] else s.value
        elif new_counts(s.labels):
            out[k] = s.value
    return out


def _group(labels: dict) -> int | None:
    # A standalone expert server (not in an app) labels its group with its shard name.
    g = labels.get("group", "")
    return int(g) if g.isdigit() else None


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """q-quantile from (upper bound, cumulative count) pairs, series summed by bound; None
    where Prometheus' histogram_quantile gives NaN (nothing observed, no +Inf bucket).

    Within a bucket observations are taken as spread evenly; a quantile in the +Inf bucket
    is the highest finite bound, and the first bucket starts at 0."""
    acc: dict[float, float] = defaultdict(float)
    for le, n in buckets:
        acc[le] += n
    bounds = sorted(acc.items())
    if len(bounds) < 2 or not math.isinf(bounds[-1][0]) or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    b = next((i for i, (_, count) in enumerate(bounds[:-1]) if count >= rank), len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2][0]
    upper, count = bounds[b]
    if b == 0 and upper <= 0:
        return upper
    lower, below = bounds[b - 1] if b > 0 else (0.0, 0.0)
    if count <= below:
        return lower
    return lower + (upper - lower) * (rank - below) / (count - below)


def _buckets(now: Index, name: str) -> list[tuple[float, float]]:
    return [(float(s.labels["le"]), s.value) for s in now.get(f"{name}_bucket", ())]


class Window:
    """Two gathers `dt` seconds apart; `prev` None: no earlier gather (rates unknown)."""

    def __init__(self, now: dict[str, Family], prev: dict[str, Family] | None, dt: float | None):
        self.now, self.prev = index(now), index(prev) if prev is not None else None
        self.dt = dt if self.prev is not None and dt is not None and dt > 0 else None
        self.answered = {s.labels.get("process") for ss in (self.prev or {}).values() for s in ss}


def _increase(w: Window, name: str, where=lambda labels: True) -> dict[tuple, float]:
    """Per series of `name`: growth since `prev` (all of it when there is no `prev`).

    A counter that went down was restarted, so all of its value is new; so is a series
    that a process which answered the earlier gather did not have yet. A process that did
    not answer then contributes nothing this time: most often it was only slow, and its
    whole history counted as one window's growth would draw a spike."""
    cur = [s for s in w.now.get(name, ()) if where(s.labels)]
    if w.prev is None:
        return {_key(s): s.value for s in cur}
    return increase(cur, w.prev.get(name, ()), lambda labels: labels.get("process") in w.answered)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _sum(values: list[float]) -> float | None:
    return sum(values) if values else None


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def heat_map(w: Window) -> dict:
    """Routed (token, expert) pairs per layer and expert: per second over the window, or
    cumulative totals when there is no earlier gather."""
    name = "moe_serve_router_routed_tokens_total"
    grown = _increase(w, name)
    cells: dict[tuple[int, int], float] = defaultdict(float)
    group_of: dict[tuple[int, int], int] = {}
    for s in w.now.get(name, ()):
        cell = int(s.labels["layer"]), int(s.labels["expert"])
        group_of[cell] = int(s.labels["group"])
        cells[cell] += grown.get(_key(s), 0.0) / (w.dt or 1.0)
    layers = 1 + max((l for l, _ in group_of), default=-1)
    experts = 1 + max((e for _, e in group_of), default=-1)
    values = [[cells.get((l, e), 0.0) for e in range(experts)] for l in range(layers)]
    groups = [[group_of.get((l, e), -1) for e in range(experts)] for l in range(layers)]
    per_group: dict[int, float] = defaultdict(float)
    for cell, v in cells.items():
        per_group[group_of[cell]] += v
    return {"layers": layers, "experts": experts, "values": values, "group": groups,
            "per_group": dict(per_group), "unit": "pairs/s" if w.dt else "pairs", "cumulative": not w.dt}


def expert_groups(w: Window, report: dict, heat: dict) -> list[dict]:
    now = w.now
    by_group: dict[int | None, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for name in ("moe_serve_expert_replicas", "moe_serve_expert_busy",
                 "moe_serve_router_routed_tokens_rate_per_second", "moe_serve_expert_rpc_duration_seconds_bucket"):
        for s in now.get(name, ()):
            by_group[_group(s.labels)][name].append(s)
    wire: dict[int | None, float] = defaultdict(float)
    if w.dt:
        for k, n in _increase(w, "moe_serve_wire_bytes_total").items():
            wire[_group(dict(k))] += n / w.dt
    ids = {int(k[len(GROUP_PREFIX):]) for k in report if k.startswith(GROUP_PREFIX)}
    ids.update(g for g in by_group if g is not None)
    ids.update(heat["per_group"])
    out = []
    for g in sorted(ids):
        mine, policy = by_group[g], report.get(f"{GROUP_PREFIX}{g}") or {}
        # Every attention process reports the replica counts it sees; they agree, or the
        # highest is the one about to be true.
        gauge = {state: max((s.value for s in mine["moe_serve_expert_replicas"] if s.labels.get("state") == state),
                            default=None) for state in ("current", "target")}
        busy = {s.labels.get("replica", "?"): s.value for s in mine["moe_serve_expert_busy"]}
        demand = _sum([s.value for s in mine["moe_serve_router_routed_tokens_rate_per_second"]])
        rpc = [(float(s.labels["le"]), s.value) for s in mine["moe_serve_expert_rpc_duration_seconds_bucket"]]
        out.append({
            "group": g, "name": f"{GROUP_PREFIX}{g}",
            "current": policy.get("current", gauge["current"]), "target": policy.get("target", gauge["target"]),
            "busy": _mean(list(busy.values())) if busy else policy.get("pressure"),
            "replicas": busy,
            "demand": demand if demand is not None else policy.get("load"),
            "routed": heat["per_group"].get(g, 0.0),
            "rpc_p50": histogram_quantile(0.5, rpc), "rpc_p99": histogram_quantile(0.99, rpc),
            "wire_bytes_per_s": wire[g] if w.dt else None,
        })
    return out


def requests(w: Window) -> dict:
    now = w.now
    ttft = _buckets(now, "gen_ai_server_time_to_first_token_seconds")
    tpot = _buckets(now, "gen_ai_server_time_per_output_token_seconds")
    tokens_per_s = None
    if w.dt:
        def output(labels: dict) -> bool:
            return labels.get("gen_ai_token_type") == "output"
        tokens_per_s = sum(_increase(w, "gen_ai_client_token_usage_sum", output).values()) / w.dt
    outcomes: dict[str, float] = defaultdict(float)
    for s in now.get("moe_serve_requests_total", ()):
        outcomes[s.labels.get("outcome", "")] += s.value
    kv = [s.value for s in now.get("moe_serve_kv_cache_usage", ())]
    grown = {name: sum(_increase(w, f"moe_serve_{name}_total").values())
             for name in ("prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "prefix_cache_evictions",
                          "preemptions")}
    queried = grown["prefix_cache_queried_tokens"]
    return {
        "ttft_p50": histogram_quantile(0.5, ttft), "ttft_p99": histogram_quantile(0.99, ttft),
        "tpot_p50": histogram_quantile(0.5, tpot), "tpot_p99": histogram_quantile(0.99, tpot),
        "output_tokens_per_s": tokens_per_s,
        "running": _sum([s.value for s in now.get("moe_serve_requests_running", ())]),
        "waiting": _sum([s.value for s in now.get("moe_serve_requests_waiting", ())]),
        "kv_usage": _mean(kv), "kv_usage_max": max(kv, default=None),
        "errors": sum(outcomes.get(o, 0.0) for o in ("error", "rejected", "overloaded", "unavailable")),
        "total": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        # Over the window (since start on a first gather): prompt tokens served from the prefix cache.
        "prefix_hit_rate": grown["prefix_cache_hit_tokens"] / queried if queried else None,
        "prefix_evictions": grown["prefix_cache_evictions"], "preemptions": grown["preemptions"],
    }


def summarize(now_families: dict[str, Family], prev_families: dict[str, Family] | None,
              dt_seconds: float | None, report: dict[str, dict]) -> dict:
    """The page's data: heat map, expert groups, attention and requests. JSON-ready (no NaN)."""
    w = Window(now_families, prev_families, dt_seconds)
    heat = heat_map(w)
    attention = report.get(ATTENTION) or {}
    out = {
        "window_s": w.dt,
        "heatmap": heat,
        "groups": expert_groups(w, report, heat),
        "attention": {k: attention.get(k) for k in ("current", "target", "load", "pressure")},
        "requests": requests(w),
    }
    return _clean(out)


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return _finite(v)
