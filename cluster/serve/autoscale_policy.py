"""Replica counts from observed load: expert groups by routed tokens, attention by requests.

The decision is a pure function of what was observed (`decide`), so it is tested on
recorded load traces without Ray. `AppPolicy` adapts it to Ray Serve's application-level
policy: Serve calls it every control-loop tick with one AutoscalingContext per deployment
and applies the returned counts.

    attention replicas report  routed_tps.g<g>  (pairs/s routed to group g), running, waiting, kv_usage
    expert replicas report     busy             (fraction of wall time computing; CPU time on CPU)

    demand(g)  = sum over attention replicas of routed_tps.g<g>
    up         = ceil(demand / target)              (+1 if the replicas are busier than max_busy)
    down       = ceil(demand / (target * (1 - h)))  (only below the current count: hysteresis)
    acted on   once the wish has held upscale_delay_s / downscale_delay_s, within [min, max]

Serve's own delays and factors are left neutral (see cluster/serve/builder.py): the delays are
applied here, where they can be tested.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from cluster.observe.names import ATTENTION, GROUP_PREFIX

log = logging.getLogger("ray.serve")



@dataclass(frozen=True)
class Rule:
    """One deployment's settings, whatever it scales on."""

    min_replicas: int
    max_replicas: int
    target: float                  # load one replica should carry
    hysteresis: float
    max_pressure: float            # busy fraction (experts) or KV use (attention) that adds a replica
    upscale_delay_s: float
    downscale_delay_s: float

    @classmethod
    def for_group(cls, s) -> Rule:
        return cls(s.min_replicas, s.max_replicas, s.target_tokens_per_s, s.hysteresis, s.max_busy,
                   s.upscale_delay_s, s.downscale_delay_s)

    @classmethod
    def for_attention(cls, s) -> Rule:
        return cls(s.min_replicas, s.max_replicas, s.target_requests, s.hysteresis, s.max_kv_usage,
                   s.upscale_delay_s, s.downscale_delay_s)


def wanted(load: float, pressure: float | None, current: int, rule: Rule) -> int:
    """The count the load asks for now, before delays."""
    up = math.ceil(load / rule.target) if load > 0 else 0
    if pressure is not None and pressure > rule.max_pressure:
        up = max(up, current + 1)
    if up > current:
        n = up
    else:
        down = math.ceil(load / (rule.target * (1 - rule.hysteresis))) if load > 0 else 0
        n = min(current, down)
    return max(rule.min_replicas, min(rule.max_replicas, n))


def decide(load: float, pressure: float | None, current: int, rule: Rule, state: dict, now: float
           ) -> tuple[int, dict]:
    """-> (replica count, new state). `current` is the count last decided; `state` is what
    this function returned last time for the same deployment ({} at first)."""
    want = wanted(load, pressure, current, rule)
    if want == current:
        return current, {}
    direction = 1 if want > current else -1
    since = state.get("since", now) if state.get("direction") == direction else now
    delay = rule.upscale_delay_s if direction > 0 else rule.downscale_delay_s
    if now - since >= delay:
        return want, {}
    return current, {"direction": direction, "since": since}


def group_demand(attention_metrics: dict[str, dict], group: int) -> float:
    """Routed pairs/s for a group, summed over the attention replicas that report it."""
    return float(sum((attention_metrics.get(f"routed_tps.g{group}") or {}).values()))


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


class AppPolicy:
    """Ray Serve application-level policy (`policy_kwargs: {config: <the app's config>}`)."""

    def __init__(self, config: dict | None = None):
        from cluster.serve.app_config import decode, group_scaling

        cfg = decode(config or {}, "autoscaling policy config")
        self.name = cfg.name
        self.attention = Rule.for_attention(cfg.autoscaling.attention)
        self.default_group = Rule.for_group(cfg.autoscaling.experts)
        self.groups = {g: Rule.for_group(group_scaling(cfg, s)) for g, s in enumerate(cfg.expert_groups)}
        self._directory = None
        self._published: tuple[float, dict] = (-math.inf, {})     # when, and the targets then

    def rule(self, name: str) -> Rule | None:
        if name == ATTENTION:
            return self.attention
        if name.startswith(GROUP_PREFIX):
            return self.groups.get(int(name[len(GROUP_PREFIX):]), self.default_group)
        return None

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        now = time.time()
        by_name = {dep.name: (dep, ctx) for dep, ctx in contexts.items()}
        att = by_name.get(ATTENTION)
        att_metrics = (att[1].aggregated_metrics or {}) if att else {}
        decisions, states, report = {}, {}, {}
        for name, (dep, ctx) in by_name.items():
            rule = self.rule(name)
            if rule is None:
                continue
            metrics = ctx.aggregated_metrics or {}
            if name == ATTENTION:
                load = sum((metrics.get("running") or {}).values()) + sum((metrics.get("waiting") or {}).values())
                pressure = mean((metrics.get("kv_usage") or {}).values())
            else:
                load = group_demand(att_metrics, int(name[len(GROUP_PREFIX):]))
                pressure = mean((metrics.get("busy") or {}).values())
            n, st = decide(load, pressure, ctx.target_num_replicas, rule, ctx.policy_state.get("moe", {}), now)
            decisions[dep], states[dep] = n, {"moe": st}
            report[name] = {"load": load, "pressure": pressure, "current": ctx.current_num_replicas, "target": n}
        self._publish(report)
        return decisions, states

    def _publish(self, report: dict) -> None:
        """Hand the decisions to the endpoint directory, where telemetry and dashboards read them.
        Fire and forget: the controller's loop must not wait on it. Serve calls the policy every
        tick (0.1 s) and its readers look once a second, so a report goes out once a second, or
        at once when a target changes."""
        now, targets = time.monotonic(), {name: r["target"] for name, r in report.items()}
        if now - self._published[0] < 1.0 and targets == self._published[1]:
            return
        self._published = (now, targets)
        try:
            if self._directory is None:
                from cluster.serve.directory import get_directory
                self._directory = get_directory(f"{self.name}-endpoints")
            self._directory.set_scaling.remote(report)
        except Exception:
            log.debug("autoscaling report not published", exc_info=True)
            self._directory = None
