"""`moe-serve tune`: autoscaling settings proposed from recorded load, with the reasoning.

    moe-serve top --record load.jsonl            # or: tune --metrics http://host:8000
    moe-serve tune --metrics load.jsonl --utilization 0.7 --config app.yaml --out tuned.yaml

The policy (cluster/serve/autoscale_policy.py) asks for ceil(demand / target) replicas of a group,
where demand is routed (token, expert) pairs/s. Every setting below is read off the
recording so that this rule, run on the recorded load, does what an operator wants:

target_tokens_per_s   A replica's capacity is what it serves per second of compute: routed
                      pairs ÷ busy replica-seconds (`routed_tokens_total` and
                      `expert_busy_time_seconds_total` deltas, summed over the recording; a
                      ratio of totals, so quiet intervals weigh little). At target =
                      capacity × utilization the count the rule asks for keeps each replica
                      busy that fraction of the time, the rest being headroom for bursts
                      that arrive before a new replica serves. Without busy-time data the
                      capacity is the per-replica load at which mean RPC latency reached 2x
                      its light-load value (queueing has begun), or a lower bound, the
                      highest load seen, when it never did.
min_replicas          max(1, ceil(p10 demand / target)): the floor the quiet tenth of the
                      time still needs, so a lull does not strip a group it must rebuild.
max_replicas          ceil(peak demand × 1.25 / target): the peak at the target utilization
                      with a quarter more, for peaks the recording did not catch.
upscale_delay_s       A burst's rise time: from the last scrape at the median level (p50 +
                      2σ of noise) to within a tenth of the burst's peak. The wish must hold
                      for the delay, so half the median rise (the lower median) adds
                      replicas while demand is still climbing; clamped to [1, 30] s.
downscale_delay_s     Gaps between bursts (moments needing more replicas than the median
                      load does): a dip shorter than the delay removes nothing, so 1.25 × the
                      longest gap rides out every lull seen instead of removing replicas
                      only to start them again; clamped to [2 × upscale, 300] s.
hysteresis            Demand noise: σ from successive differences (robust to burst edges),
                      as a fraction of median demand (its coefficient of variation). A count
                      is given back only when demand falls h below it, so h = 2 × CV keeps
                      a load sitting on a boundary from flapping; clamped to [0.1, 0.4].
max_busy              utilization + 0.15 (within [the current value, 0.95]): busier than
                      planned means a backlog the routed demand does not show.

Then the recorded demand is replayed through the policy's own `decide` with the proposed
settings, and the replica counts, changes and seconds over capacity are printed: a check
of the proposal against the load it came from.

Attention replicas follow running + waiting requests. A replica is full when requests wait
while it runs others, so its capacity is the median running count per replica over the
intervals with requests waiting; target_requests = capacity × utilization and the other
settings follow as for the groups. With no queueing seen, target_requests is kept.

`propose` is a pure function of a Recording; the command line in cluster/tools/tune_cli.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.observe.names import ROUTED
from cluster.observe.recording import Recording
from cluster.serve.app_config import AppConfig, AttentionScaling, GroupScaling
from cluster.serve.autoscale_policy import Rule, decide
from cluster.tools.tune_series import Stats, burst_gaps, knee_load, rise_times, stats

BUSY = "moe_serve_expert_busy_time_seconds_total"
RPC = "moe_serve_expert_rpc_duration_seconds"
HEADROOM = 1.25


@dataclass
class Proposal:
    groups: dict[int, GroupScaling]
    attention: AttentionScaling
    # Settings safe for any group (smallest target, widest bounds): autoscaling.experts.
    experts: GroupScaling
    # group -> (layer, expert) pairs it served in the recording, to write expert_groups.
    layout: dict[int, set[tuple[int, int]]] = field(default_factory=dict)

    @property
    def groups_differ(self) -> bool:
        return any(s != self.experts for s in self.groups.values())


def clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def _round(x: float) -> float:
    return float(round(x)) if x >= 100 else round(x, 1)


def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def timing(name: str, times: list[float], values: list[float], target: float, base_up: float,
           base_down: float, reasons: list[str]) -> tuple[float, float, float]:
    """-> (upscale_delay_s, downscale_delay_s, hysteresis), the reasoning appended."""
    s = stats(values)
    # A rise starts once the load clears the noise around its median, not on every wobble.
    rises = rise_times(times, values, s.p50 + 2 * s.noise, s.p90)
    if s.p90 - s.p50 > 4 * s.noise and rises:
        rise = sorted(rises)[(len(rises) - 1) // 2]       # of an even count, the quicker
        up = _round(clamp(rise / 2, 1.0, 30.0))
        reasons.append(f"{name}: upscale_delay_s = {up:g}: bursts rose from the median level to 90% of their peak "
                       f"in {rise:.1f}s (median of {len(rises)} rise(s)); half of that, within [1, 30]")
    else:
        up = base_up
        reasons.append(f"{name}: upscale_delay_s = {up:g} kept: no bursts stand out of the noise")
    gaps = burst_gaps(times, [math.ceil(v / target) for v in values], math.ceil(s.p50 / target))
    if gaps:
        down = _round(clamp(HEADROOM * max(gaps), 2 * up, 300.0))
        reasons.append(f"{name}: downscale_delay_s = {down:g}: longest gap between bursts {max(gaps):.1f}s "
                       f"({len(gaps)} gap(s)) x {HEADROOM}, within [{2 * up:g}, 300]")
    else:
        down = max(base_down, 2 * up)
        reasons.append(f"{name}: downscale_delay_s = {down:g} kept: fewer than two bursts, no gap to ride out")
    cv = s.noise / s.p50 if s.p50 > 0 else 0.0
    h = round(clamp(2 * cv, 0.1, 0.4), 2)
    reasons.append(f"{name}: hysteresis = {h:g}: noise σ {_n(s.noise)} is {100 * cv:.1f}% of p50 "
                   f"{_n(s.p50)}; 2 x that, within [0.1, 0.4]")
    return up, down, h


def bounds(name: str, s: Stats, target: float, reasons: list[str]) -> tuple[int, int]:
    lo = max(1, math.ceil(s.p10 / target))
    hi = max(lo, math.ceil(s.peak * HEADROOM / target))
    reasons.append(f"{name}: min_replicas = {lo}: max(1, ceil(p10 {_n(s.p10)} / target {_n(target)}))")
    reasons.append(f"{name}: max_replicas = {hi}: ceil(peak {_n(s.peak)} x {HEADROOM} / target {_n(target)}), "
                   f"at least min_replicas")
    return lo, hi


def group_capacity(rec: Recording, g: str, name: str, demand: list[float], reasons: list[str]) -> float | None:
    """Pairs per busy replica-second; or the latency knee, when no busy time was recorded."""
    pairs = busy = 0.0
    for w in rec.windows():
        b = w.delta(BUSY, ("group",)).get((g,))
        if b is not None:
            pairs += w.delta(ROUTED, ("group",)).get((g,), 0.0)
            busy += b
    if busy > 0 and pairs > 0:
        reasons.append(f"{name}: capacity {_n(pairs / busy)} pairs per busy replica-second "
                       f"({_n(pairs)} pairs routed over {busy:.1f} busy replica-seconds)")
        return pairs / busy
    loads, lat = [], []
    for w, d in zip(rec.windows(), demand):
        n = w.cur.gauge("moe_serve_expert_replicas", ("group", "state")).get((g, "current"))
        c = w.delta(f"{RPC}_count", ("group",)).get((g,), 0.0)
        if n and c > 0:
            loads.append(d / n)
            lat.append(w.delta(f"{RPC}_sum", ("group",)).get((g,), 0.0) / c)
    knee, grew = knee_load(loads, lat)
    if knee is None:
        reasons.append(f"{name}: no busy time and no RPC latency recorded: capacity unknown")
        return None
    reasons.append(f"{name}: no busy time recorded (expert replicas' /metrics not gathered?); falling back to "
                   + (f"the per-replica load at which mean RPC latency reached 2x its light-load value: {_n(knee)} "
                      f"pairs/s" if grew else
                      f"the highest per-replica load seen, {_n(knee)} pairs/s: RPC latency never grew, so this "
                      f"is a lower bound and the target errs on the side of more replicas"))
    return knee


def propose_group(rec: Recording, g: str, utilization: float, base: GroupScaling, reasons: list[str]) -> GroupScaling:
    name = f"group {g}"
    windows = rec.windows()
    times = [w.cur.t for w in windows]
    demand = [w.rate(ROUTED, ("group",)).get((g,), 0.0) for w in windows]
    s = stats(demand)
    reasons.append(f"{name}: demand pairs/s over {rec.duration:.0f}s ({len(windows)} intervals): p10 {_n(s.p10)}  "
                   f"p50 {_n(s.p50)}  p90 {_n(s.p90)}  peak {_n(s.peak)}  mean {_n(s.mean)}")
    capacity = group_capacity(rec, g, name, demand, reasons)
    if capacity is None or s.peak <= 0:
        reasons.append(f"{name}: keeping the current settings (no load to read them from)")
        return base
    target = max(0.1, _round(capacity * utilization))
    reasons.append(f"{name}: target_tokens_per_s = {_n(target)}: capacity {_n(capacity)} x utilization {utilization:g}"
                   f" (was {_n(base.target_tokens_per_s)})")
    lo, hi = bounds(name, s, target, reasons)
    up, down, h = timing(name, times, demand, target, base.upscale_delay_s, base.downscale_delay_s, reasons)
    busy = round(clamp(utilization + 0.15, base.max_busy, 0.95), 2)
    if busy != base.max_busy:
        reasons.append(f"{name}: max_busy = {busy:g}: above the target utilization {utilization:g}, so it signals "
                       f"a backlog, not the load the target already plans for")
    out = GroupScaling(min_replicas=lo, max_replicas=hi, target_tokens_per_s=target, hysteresis=h, max_busy=busy,
                       upscale_delay_s=up, downscale_delay_s=down)
    counts = replay(times, demand, Rule.for_group(out))
    steps = [b - a for a, b in zip([rec.scrapes[0].t, *times], times)]
    over = sum(dt for dt, d, n in zip(steps, demand, counts) if d > n * capacity)
    changes = sum(a != b for a, b in zip(counts, counts[1:]))
    reasons.append(f"{name}: replayed through the policy: {min(counts)}-{max(counts)} replicas (mean "
                   f"{sum(counts) / len(counts):.1f}), {changes} change(s); demand above their capacity for "
                   f"{over:.0f}s of {rec.duration:.0f}s (waiting out upscale_delay_s; replica start-up comes on top)")
    return out


def replay(times: list[float], load: list[float], rule: Rule) -> list[int]:
    """The replica counts the policy would have chosen on this load (each step's count
    taken as serving at once: the start-up time of a replica is not in the recording)."""
    current, state, out = rule.min_replicas, {}, []
    for t, x in zip(times, load):
        current, state = decide(x, None, current, rule, state, t)
        out.append(current)
    return out


def propose_attention(rec: Recording, utilization: float, base: AttentionScaling,
                      reasons: list[str]) -> AttentionScaling:
    name = "attention"
    times, load, full = [], [], []
    for w in rec.windows():
        running = w.cur.gauge("moe_serve_requests_running", ("process", "replica"))
        waiting = w.cur.gauge("moe_serve_requests_waiting", ("process", "replica"))
        if not running:
            continue
        times.append(w.cur.t)
        load.append(sum(running.values()) + sum(waiting.values()))
        if sum(waiting.values()) > 0:
            full.append(sum(running.values()) / len(running))
    if not load or max(load) <= 0:
        reasons.append(f"{name}: no requests recorded: keeping the current settings")
        return base
    s = stats(load)
    reasons.append(f"{name}: running + waiting requests: p10 {_n(s.p10)}  p50 {_n(s.p50)}  p90 {_n(s.p90)}  "
                   f"peak {_n(s.peak)}")
    if full:
        capacity = sorted(full)[len(full) // 2]
        target = _round(max(1.0, capacity * utilization))
        reasons.append(f"{name}: target_requests = {target:g}: a replica held {_n(capacity)} running requests "
                       f"(median over {len(full)} intervals with requests waiting) x utilization {utilization:g}")
    else:
        target = base.target_requests
        reasons.append(f"{name}: target_requests = {target:g} kept: no request ever waited, so the recording "
                       f"does not show what a replica can hold")
    lo, hi = bounds(name, s, target, reasons)
    up, down, h = timing(name, times, load, target, base.upscale_delay_s, base.downscale_delay_s, reasons)
    return AttentionScaling(min_replicas=lo, max_replicas=hi, target_requests=target, max_kv_usage=base.max_kv_usage,
                            hysteresis=h, upscale_delay_s=up, downscale_delay_s=down)


def layout(rec: Recording) -> dict[int, set[tuple[int, int]]]:
    out: dict[int, set[tuple[int, int]]] = {}
    for scrape in rec.scrapes:
        for labels, _ in scrape.series(ROUTED).values():
            out.setdefault(int(labels["group"]), set()).add((int(labels["layer"]), int(labels["expert"])))
    return out


def propose(recording: Recording, utilization: float = 0.7, config: AppConfig | None = None
            ) -> tuple[Proposal, list[str]]:
    """-> (proposed settings, the reasoning, one line per step). `config`: the settings now
    in force, kept where the recording says nothing about them."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if len(recording.windows()) < 2:
        raise ValueError(f"need at least 3 scrapes to read rates from, got {len(recording.scrapes)}")
    cfg = config or AppConfig()
    reasons: list[str] = []
    if len(recording.windows()) < 30:
        reasons.append(f"only {len(recording.windows())} intervals recorded: percentiles and bursts are rough; "
                       f"a few minutes of typical load, bursts included, say more")
    groups = {}
    for g in sorted(layout(recording)):
        spec = cfg.expert_groups[g] if g < len(cfg.expert_groups) else None
        base = (spec.scaling if spec and spec.scaling else None) or cfg.autoscaling.experts
        groups[g] = propose_group(recording, str(g), utilization, base, reasons)
    if not groups:
        reasons.append(f"no {ROUTED} in the recording: is it the front door's /metrics?")
    attention = propose_attention(recording, utilization, cfg.autoscaling.attention, reasons)
    s = list(groups.values()) or [cfg.autoscaling.experts]
    experts = GroupScaling(
        min_replicas=min(x.min_replicas for x in s), max_replicas=max(x.max_replicas for x in s),
        target_tokens_per_s=min(x.target_tokens_per_s for x in s), hysteresis=max(x.hysteresis for x in s),
        max_busy=min(x.max_busy for x in s), upscale_delay_s=min(x.upscale_delay_s for x in s),
        downscale_delay_s=max(x.downscale_delay_s for x in s))
    return Proposal(groups, attention, experts, layout(recording)), reasons
