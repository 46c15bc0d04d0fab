"""The autoscaling policy as a pure function: small cases, and replays of a recorded load trace."""

import json
from pathlib import Path

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

from cluster.serve.autoscale_policy import AppPolicy, Rule, decide, wanted

RULE = Rule(min_replicas=1, max_replicas=4, target=100.0, hysteresis=0.2, max_pressure=0.85,
            upscale_delay_s=5.0, downscale_delay_s=30.0)
TRACE = json.loads((Path(__file__).parent / "data" / "skewed_routing_trace.json").read_text())["samples"]


@pytest.mark.parametrize("load, pressure, current, want", [
    (0, None, 1, 1),           # idle stays at the minimum
    (250, None, 1, 3),         # ceil(250 / 100)
    (250, None, 3, 3),         # already enough
    (190, None, 3, 3),         # 2 would carry 190 only at 95% of target: hysteresis keeps 3
    (150, None, 3, 2),         # 2 carry 150 with room (150 <= 2 * 100 * 0.8)
    (10_000, None, 2, 4),      # capped at max_replicas
    (50, 0.95, 1, 2),          # busier than max_busy: one more, whatever the counted demand
    (50, 0.95, 4, 4),          # ... but never past the maximum
    (150, 0.5, 2, 2),          # not busy, demand fits: unchanged
])
def test_wanted(load, pressure, current, want):
    assert wanted(load, pressure, current, RULE) == want


def run(loads, rule=RULE, start=1, times=None, pressure=None):
    """Replay loads through decide(), one tick per load (at `times`, default 1 s apart):
    the count after each tick."""
    n, state, out = start, {}, []
    for i, load in enumerate(loads):
        n, state = decide(load, pressure, n, rule, state, times[i] if times else float(i))
        out.append(n)
    return out


def test_upscale_waits_for_its_delay_and_downscale_for_its_own():
    counts = run([300] * 10 + [0] * 40)
    assert counts[:5] == [1] * 5 and counts[5] == 3          # wish held 5 s, then acted on
    up_at = 5
    down_at = counts.index(1, up_at)
    assert down_at - 10 == 30                                 # load gone at t=10, down 30 s later


def test_a_reversal_restarts_the_delay():
    # Two ticks over target, one under, again over: the wish to scale up starts anew.
    counts = run([300, 300, 300, 50, 300, 300, 300, 300, 300, 300])
    assert counts[:9] == [1] * 9 and counts[9] == 3


def changes(counts: list[int]) -> int:
    return sum(a != b for a, b in zip(counts, counts[1:]))


def test_noise_around_a_boundary_does_not_flap():
    loads = [195, 205] * 60                                  # straddles 2 replicas' capacity
    counts = run(loads, start=2)
    assert counts == [2] * len(loads)                        # no tick's wish holds for the delay
    # Without hysteresis or delays the same noise moves it every tick.
    eager = Rule(1, 4, 100.0, 0.0, 0.85, 0.0, 0.0)
    assert changes(run(loads, rule=eager, start=2)) >= 100


def test_min_and_max_hold_under_any_load():
    rule = Rule(2, 3, 100.0, 0.2, 0.85, 0.0, 0.0)
    assert run([0, 0, 1000, 1000, 0], rule=rule, start=2) == [2, 2, 3, 3, 2]


def demand_series(group: str) -> list[float]:
    return [s["demand"].get(group, 0.0) for s in TRACE]


TIMES = [s["t"] for s in TRACE]


def test_recorded_skewed_trace_scales_the_busy_group_and_back():
    """The live app's recorded load (80% of routing to group 0), replayed at the live test's settings.
    Recorded with 6 streaming clients from t=8 s to t=45 s (tests/data/skewed_routing_trace.json)."""
    rule = Rule(1, 3, 500.0, 0.2, 1.0, 2.0, 6.0)
    g0, g1 = run(demand_series("0"), rule, times=TIMES), run(demand_series("1"), rule, times=TIMES)
    assert max(g0) >= 2, "the busy group must scale up"
    assert max(g1) == 1, "the quiet group stays at its minimum"
    assert g0[-1] == 1, "and the busy group comes back down when the load stops"
    loaded = [i for i, s in enumerate(TRACE) if s["demand"].get("0", 0) > 0]
    assert g0.index(max(g0)) > loaded[0], "scaling follows the load, not before it"
    assert changes(g0) <= 6, f"too many changes: {g0}"


def test_recorded_trace_with_longer_delays_changes_less():
    quick = run(demand_series("0"), Rule(1, 3, 500.0, 0.2, 1.0, 0.0, 0.0), times=TIMES)
    slow = run(demand_series("0"), Rule(1, 3, 500.0, 0.2, 1.0, 5.0, 15.0), times=TIMES)
    assert max(quick) == max(slow) == 3 and changes(quick) >= 2
    assert changes(slow) <= changes(quick)
    assert slow.index(3) > quick.index(3)                     # the delay is waited out before acting


def context(name: str, target: int, metrics: dict, state: dict | None = None) -> tuple:
    dep = DeploymentID(name=name, app_name="moe-serve")
    return dep, AutoscalingContext(
        deployment_id=dep, deployment_name=name, app_name="moe-serve", current_num_replicas=target,
        target_num_replicas=target, running_replicas=[], total_num_requests=0, total_queued_requests=0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=0.0, config=None)


def test_app_policy_reads_attention_reports_and_scales_each_group():
    config = {"groups": 2, "autoscaling": {
        "experts": {"target_tokens_per_s": 100, "max_replicas": 4, "upscale_delay_s": 0, "downscale_delay_s": 0},
        "attention": {"max_replicas": 3, "target_requests": 10, "upscale_delay_s": 0}}}
    policy = AppPolicy(config)
    policy._publish = lambda report: None      # no Ray cluster here to publish to
    # Two attention replicas each route 150 pairs/s to group 0 and 20 to group 1.
    att = {"routed_tps.g0": {"a": 150.0, "b": 150.0}, "routed_tps.g1": {"a": 20.0, "b": 20.0},
           "running": {"a": 12.0, "b": 9.0}, "waiting": {"a": 3.0, "b": 0.0}, "kv_usage": {"a": 0.2, "b": 0.1}}
    ctxs = dict([context("Attention", 1, att), context("ExpertGroup-0", 1, {"busy": {"x": 0.6}}),
                 context("ExpertGroup-1", 1, {"busy": {"y": 0.1}}), context("Frontend", 1, {})])
    decisions, states = policy(ctxs)
    by_name = {d.name: n for d, n in decisions.items()}
    assert by_name == {"Attention": 3, "ExpertGroup-0": 3, "ExpertGroup-1": 1}    # 24/10, 300/100, 40/100


def test_app_policy_per_group_settings_override_the_default():
    config = {"expert_groups": [{"experts": [0, 1], "scaling": {"target_tokens_per_s": 50, "upscale_delay_s": 0}},
                                {"experts": [2, 3]}],
              "autoscaling": {"experts": {"target_tokens_per_s": 1000, "upscale_delay_s": 0}}}
    policy = AppPolicy(config)
    policy._publish = lambda report: None
    att = {"routed_tps.g0": {"a": 120.0}, "routed_tps.g1": {"a": 120.0}}
    ctxs = dict([context("Attention", 1, att), context("ExpertGroup-0", 1, {}), context("ExpertGroup-1", 1, {})])
    decisions, _ = policy(ctxs)
    by_name = {d.name: n for d, n in decisions.items()}
    assert by_name["ExpertGroup-0"] == 3 and by_name["ExpertGroup-1"] == 1


@pytest.mark.parametrize("section, bad", [("experts", {"hysteresis": 1.0}), ("experts", {"target_tokens_per_s": 0}),
                                          ("attention", {"hysteresis": 1.0}), ("attention", {"target_requests": 0})])
def test_settings_the_policy_would_divide_by_are_refused_by_name(section, bad):
    """Refused when the config is read, not found out by a ZeroDivisionError inside Serve's controller."""
    from cluster.serve.app_config import decode
    from mixtral.config import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        decode({"autoscaling": {section: bad}})
