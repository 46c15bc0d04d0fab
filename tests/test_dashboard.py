"""The dashboard: the Grafana JSON the chart ships, the figures of the built-in page, and the page.

Every figure is checked against metrics recorded through the real OpenTelemetry instruments
and parsed back from their exposition text, as the front door gathers them.
"""

import asyncio
import json
import random
from bisect import bisect_left

import pytest
import torch
from fastapi import FastAPI

from attention_service.async_engine import Delta
from attention_service.block_manager import BlockManager
from attention_service.errors import RequestError
from attention_service.grpc_transport import RpcInstruments, WireStats
from attention_service.sampling_params import SamplingParams
from attention_service.sequence import Sequence
from cluster.api import request_telemetry
from cluster.observe import dashboard, telemetry
from cluster.observe.dashboard_data import histogram_quantile, summarize
from cluster.observe.metrics_gather import merge, parse, samples
from router.routing_stats import RoutingStats

LAYERS, EXPERTS, GROUPS = 6, 8, 4
GROUP_OF = torch.arange(EXPERTS).repeat(LAYERS, 1) // (EXPERTS // GROUPS)      # experts 2g, 2g+1 -> group g


class Busy:
    """What an expert servicer registers: cumulative compute seconds, pairs computed, its labels."""

    def __init__(self, group: int, replica: str, seconds: float):
        self.busy_seconds, self.labels = seconds, {"group": str(group), "replica": replica}
        self.pairs = int(seconds * 1000)


class EngineCounts:
    """What an engine exposes to telemetry: its prefix cache's counts (a real block manager's) and
    its preemptions."""

    def __init__(self):
        self.blocks, self.num_preemptions = BlockManager(64, 4), 0

    @property
    def prefix_stats(self):
        return self.blocks.stats

    def serve(self, prompt: list[int]) -> None:
        s = Sequence(prompt, SamplingParams(), seed=0)
        rest = s.num_tokens - len(self.blocks.cached_prefix(s)) * self.blocks.block_size
        self.blocks.start(s, rest)
        s.num_computed = s.num_tokens
        self.blocks.commit(s)
        self.blocks.free(s)


def route(stats: RoutingStats, tokens: int, seed: int, hot: int = 1) -> None:
    """Top-2 routing of `tokens` tokens per layer, skewed toward group `hot`'s experts."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(EXPERTS)
    weights[2 * hot:2 * hot + 2] = 6.0
    for layer in range(LAYERS):
        stats.add(layer, torch.multinomial(weights.expand(tokens, EXPERTS), 2, generator=g))


class App:
    """An attention, an expert and a front-door process, each with its own Telemetry."""

    def __init__(self):
        self.attention = telemetry.Telemetry("attention")
        self.expert = telemetry.Telemetry("expert")
        self.front = telemetry.Telemetry("frontend")
        self.routing = RoutingStats(GROUP_OF)
        self.attention.routing_sources.add(self.routing)
        self.wire = WireStats()
        self.rpc = RpcInstruments.on(self.attention.meter)
        self.attention.wire_sources.add(self.wire)
        self.busy = [Busy(g, f"10.0.0.{g}:{r}", 3.0 * g + r) for g in range(GROUPS) for r in range(2)]
        self.engine = EngineCounts()
        self.attention.engine_sources.add(self.engine)
        self.engine.serve(list(range(100, 110)))
        for b in self.busy:
            self.expert.busy_sources.add(b)

    def families(self):
        return merge([parse(self.attention.text(), "attention-a"), parse(self.expert.text(), "experts"),
                      parse(self.front.text(), "frontend")])

    def record_attention(self, rpc_seconds: list[float], report: dict) -> None:
        """As the attention deployment's transport and load reporter record them."""
        for i, s in enumerate(rpc_seconds):
            g = i % GROUPS
            attrs = {"group": str(g), "replica": f"10.0.0.{g}:{i % 2}"}
            self.rpc.duration.record(s, attrs)
            self.rpc.rows.record(8 + i % 50, attrs)
            for d in ("sent", "received"):
                self.wire.per_group_bytes[(g, d)] = self.wire.per_group_bytes.get((g, d), 0) + 1000 * (g + 1)
        mine = {"replica": "a"}
        for g in range(GROUPS):
            self.attention.routed_rate.set(100.0 * (g + 1), {"group": str(g), **mine})
            self.attention.replicas.set(report[f"ExpertGroup-{g}"]["current"], {"group": str(g), "state": "current"})
            self.attention.replicas.set(report[f"ExpertGroup-{g}"]["target"], {"group": str(g), "state": "target"})
        for gauge, v in ((self.attention.kv_usage, 0.42), (self.attention.running, 5), (self.attention.waiting, 2)):
            gauge.set(v, mine)

    def record_experts(self) -> None:
        for b in self.busy:
            self.expert.busy.set(0.1 * int(b.labels["group"]) + 0.05 * int(b.labels["replica"][-1]), b.labels)

    def serve_requests(self, monkeypatch) -> None:
        """Requests through the front door's own wrapper: finished, refused and failed."""
        monkeypatch.setattr(telemetry, "_current", self.front)

        def stream(tokens: int, fail: Exception | None = None):
            async def gen(_headers):
                for i in range(tokens):
                    yield Delta([i], "", "stop" if i == tokens - 1 else None)
                if fail:
                    raise fail
            return gen

        async def run(open_stream):
            try:
                async for _ in request_telemetry.observed(open_stream, 12, "tiny"):
                    pass
            except (RequestError, RuntimeError):
                pass

        for s in (stream(5), stream(3), stream(0, RequestError("too long", "prompt")), stream(2, RuntimeError("lost"))):
            asyncio.run(run(s))


REPORT = {f"ExpertGroup-{g}": {"load": 100.0 * (g + 1), "pressure": 0.1 * g, "current": 1 + (g == 1),
                               "target": 1 + 3 * (g == 1)} for g in range(GROUPS)}
REPORT["Attention"] = {"load": 7.0, "pressure": 0.42, "current": 2, "target": 2}


@pytest.fixture
def app(monkeypatch):
    a = App()
    route(a.routing, 64, seed=1)
    a.record_attention([0.0004 * (1 + i % 40) for i in range(200)], REPORT)
    a.record_experts()
    a.serve_requests(monkeypatch)
    return a


# --- Grafana ------------------------------------------------------------------------------
def test_chart_dashboard_is_current():
    assert dashboard.CHART_DASHBOARD.read_text(encoding="utf-8") == dashboard.dashboard_text(), (
        f"{dashboard.CHART_DASHBOARD} is stale: run `python -m cluster.observe.dashboard --write`")


def test_grafana_dashboard_shape():
    d = dashboard.grafana_dashboard()
    assert (d["uid"], d["title"]) == ("moe-serve", "moe-serve") and 36 <= d["schemaVersion"] <= 41
    var = d["templating"]["list"][0]
    assert (var["name"], var["type"], var["query"]) == ("datasource", "datasource", "prometheus")
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    assert {p.key for p in dashboard.PANELS} >= {"heatmap", "replicas", "busy", "ttft", "tpot", "tokens", "kv",
                                                 "queue", "errors", "rpc", "wire"}
    for p in panels:
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells |= {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
    assert len(cells) == sum(p["gridPos"]["w"] * p["gridPos"]["h"] for p in d["panels"]), "panels overlap"
    # No empty grid line: Grafana would pull the panels up and the layout would not be this one.
    assert {y for _, y in cells} == set(range(max(y for _, y in cells) + 1))


def test_metric_names_parses_promql():
    q = {"panels": [{"targets": [
        {"expr": 'histogram_quantile(0.99, sum by (group, le) (rate(a_bucket{x=~"b|c"}[$__rate_interval])))'},
        {"expr": "sum without (replica) (b_total offset 5m) / on (group) group_left (state) c:rec + 1e3"}]}]}
    assert dashboard.metric_names(q) == {"a_bucket", "b_total", "c:rec"}
    assert dashboard.label_names(q["panels"][0]["targets"][0]["expr"]) == {"group", "le", "x"}


def test_every_query_reads_exported_metrics(app):
    labels: dict[str, set] = {}
    for f in app.families().values():
        for s in f.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    d = dashboard.grafana_dashboard()
    missing = dashboard.metric_names(d) - labels.keys()
    assert not missing, f"queries read metrics nobody exports: {sorted(missing)}"
    for p in d["panels"]:
        for t in p.get("targets", []):
            names = dashboard.metric_names({"panels": [{"targets": [t]}]})
            have = set().union(*(labels[n] for n in names))
            assert dashboard.label_names(t["expr"]) <= have, (p["title"], t["expr"], sorted(have))


# --- the page's figures -------------------------------------------------------------------
def test_heat_map_is_the_routing_counts(app):
    before, t0 = app.families(), app.routing.snapshot()
    route(app.routing, 40, seed=2, hot=3)
    now, t1 = app.families(), app.routing.snapshot()
    totals = summarize(before, None, None, REPORT)["heatmap"]
    assert totals["cumulative"] and totals["values"] == t0.double().tolist()
    assert totals["group"] == GROUP_OF.tolist()
    heat = summarize(now, before, 2.0, REPORT)["heatmap"]
    assert (heat["unit"], heat["layers"], heat["experts"]) == ("pairs/s", LAYERS, EXPERTS)
    assert heat["values"] == ((t1 - t0).double() / 2.0).tolist()
    per_group = app.routing.per_group(t1 - t0)
    assert [heat["per_group"][str(g)] for g in range(GROUPS)] == pytest.approx([n / 2.0 for n in per_group])
    assert max(range(GROUPS), key=lambda g: per_group[g]) == 3


def test_restarted_and_late_processes(app):
    before = app.families()
    restarted = telemetry.Telemetry("attention")       # same process name, counters from zero
    fresh = RoutingStats(GROUP_OF)
    restarted.routing_sources.add(fresh)
    route(fresh, 10, seed=3)
    # A process the earlier gather did not hear from: its whole history is not this window's.
    late = telemetry.Telemetry("attention")
    late_routing = RoutingStats(GROUP_OF)
    late.routing_sources.add(late_routing)
    route(late_routing, 500, seed=4)
    now = merge([parse(restarted.text(), "attention-a"), parse(late.text(), "attention-b"),
                 parse(app.expert.text(), "experts")])
    heat = summarize(now, before, 1.0, REPORT)["heatmap"]
    assert heat["values"] == fresh.snapshot().double().tolist()


class _Clock:
    """The dashboard's clock, moved by the test: windows do not depend on how fast polls run."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def test_data_route_takes_rates_over_its_window(app, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(dashboard, "time", clock)

    async def gather():
        route(app.routing, 20, seed=5)
        return app.families(), REPORT

    async def poll(endpoint):
        return json.loads((await endpoint()).body)

    web = FastAPI()
    dashboard.add_dashboard_routes(web, gather, min_window_s=0.5)
    data = next(r.endpoint for r in web.routes if getattr(r, "path", "") == "/dashboard/data")
    assert any(getattr(r, "path", "") == "/dashboard" for r in web.routes)
    first = asyncio.run(poll(data))
    assert first["heatmap"]["cumulative"] and first["window_s"] is None
    clock.now += 0.3
    too_soon = asyncio.run(poll(data))                 # within the window: still totals
    assert too_soon["heatmap"]["cumulative"]
    c0 = app.routing.snapshot()                # the newest gather a window old, by then
    clock.now += 0.6
    later = asyncio.run(poll(data))
    grown = (app.routing.snapshot() - c0).double() / later["window_s"]
    assert not later["heatmap"]["cumulative"] and later["window_s"] == pytest.approx(0.6)
    assert sum(later["heatmap"]["values"], []) == pytest.approx(grown.flatten().tolist())


def _bucket_of(v: float, bounds: list[float]) -> int:
    return bisect_left(bounds, v)


def ttft_buckets(fams) -> list[tuple[float, float]]:
    return [(float(s.labels["le"]), s.value) for s in samples(fams, "gen_ai_server_time_to_first_token_seconds_bucket")]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantiles_fall_in_the_true_bucket(q):
    tel = telemetry.Telemetry("frontend")
    rnd = random.Random(q)
    attrs = {"gen_ai.request.model": "tiny", "gen_ai.operation.name": "text_completion"}
    ttft = [rnd.lognormvariate(-3.5, 1.0) for _ in range(500)]
    tpot = [rnd.uniform(0.012, 0.3) for _ in range(500)]
    for a, b in zip(ttft, tpot):
        tel.ttft.record(a, attrs)
        tel.tpot.record(b, attrs)
    fams = parse(tel.text(), "frontend")
    for name, values, bounds in (("gen_ai_server_time_to_first_token_seconds", ttft, telemetry.TTFT_BUCKETS),
                                 ("gen_ai_server_time_per_output_token_seconds", tpot, telemetry.TPOT_BUCKETS)):
        buckets = [(float(s.labels["le"]), s.value) for s in samples(fams, name + "_bucket")]
        est = histogram_quantile(q, buckets)
        true = sorted(values)[int(q * len(values)) - 1]
        assert _bucket_of(est, bounds) == _bucket_of(true, bounds), (name, q, est, true)
    assert summarize(fams, None, None, {})["requests"]["ttft_p50"] == histogram_quantile(0.5, ttft_buckets(fams))


def test_quantile_interpolates_like_prometheus():
    tel = telemetry.Telemetry("frontend")
    for _ in range(10):
        tel.ttft.record(0.03, {})             # all in (0.02, 0.04]
    fams = parse(tel.text())
    buckets = ttft_buckets(fams)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.03)
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.038)
    tel.ttft.record(99.0, {})                 # beyond the last bound: the +Inf bucket
    fams = parse(tel.text())
    buckets = ttft_buckets(fams)
    assert histogram_quantile(1.0, buckets) == telemetry.TTFT_BUCKETS[-1]
    assert histogram_quantile(0.5, []) is None


def test_groups_and_requests(app):
    before = app.families()
    app.record_attention([0.002] * 40, REPORT)
    for s in (4, 6):                           # two more requests: 4 and 6 output tokens
        app.front.token_usage.record(s, {"gen_ai.token.type": "output", "gen_ai.request.model": "tiny"})
    app.engine.serve(list(range(100, 109)) + [7, 7, 7])   # 12 tokens, 8 of them the cached 2 blocks
    app.engine.serve(list(range(200, 212)))               # 12 tokens, none cached
    app.engine.num_preemptions += 3
    out = summarize(app.families(), before, 4.0, REPORT)
    json.dumps(out, allow_nan=False)
    groups = {g["group"]: g for g in out["groups"]}
    assert sorted(groups) == list(range(GROUPS))
    for g, row in groups.items():
        assert (row["current"], row["target"]) == (REPORT[f"ExpertGroup-{g}"]["current"],
                                                   REPORT[f"ExpertGroup-{g}"]["target"])
        busy = [0.1 * g + 0.05 * r for r in range(2)]
        assert row["busy"] == pytest.approx(sum(busy) / 2)
        assert row["demand"] == pytest.approx(100.0 * (g + 1))
        assert row["wire_bytes_per_s"] == pytest.approx(2 * 1000 * (g + 1) * 10 / 4.0)   # 10 RPCs each way
        assert 0 < row["rpc_p50"] <= row["rpc_p99"] <= 0.02
    r = out["requests"]
    assert r["output_tokens_per_s"] == pytest.approx((4 + 6) / 4.0)
    assert (r["running"], r["waiting"], r["kv_usage"]) == (5, 2, pytest.approx(0.42))
    assert r["outcomes"] == {"stop": 2, "rejected": 1, "error": 1} and r["errors"] == 2 and r["total"] == 4
    assert out["attention"] == {"current": 2, "target": 2, "load": 7.0, "pressure": 0.42}
    assert r["prefix_hit_rate"] == pytest.approx(8 / 24) and r["preemptions"] == 3 and r["prefix_evictions"] == 0


def test_nothing_recorded_yet():
    out = summarize({}, None, None, {})
    json.dumps(out, allow_nan=False)
    assert out["heatmap"]["layers"] == 0 and out["groups"] == []
    assert out["requests"]["ttft_p99"] is None and out["requests"]["running"] is None
