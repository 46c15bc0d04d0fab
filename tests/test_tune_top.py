"""`moe-serve tune` and `moe-serve top` on /metrics text made by the app's own instruments.

A simulated app: one attention process and one expert process, each with its real
Telemetry, gathered as the front door gathers them. Group 0 gets about three times group
1's routed load, with two bursts; the expert replicas serve a known number of pairs per
busy second, which tune must find again.
"""

import http.server
import json
import random
import socket
import subprocess
import sys
import threading

import msgspec
import pytest
import torch
import yaml

from attention_service.grpc_transport import RpcInstruments
from cluster.observe import metrics_gather
from cluster.observe.recording import Recording, Scrape
from cluster.observe.telemetry import Telemetry
from cluster.serve import app_config
from cluster.tools.cli import main
from cluster.tools.tune import propose
from router.routing_stats import RoutingStats

CAPACITY = {0: 5000.0, 1: 4000.0}         # pairs per busy replica-second, built in
BASE = {0: 3000.0, 1: 1000.0}             # pairs/s between bursts
LAYERS, EXPERTS = 2, 4                     # expert e serves in group e % 2
REPLICAS = {0: ["10.0.0.1:7001", "10.0.0.2:7001"], 1: ["10.0.0.3:7001"]}


class Busy:
    def __init__(self, group: int, replica: str):
        self.busy_seconds, self.labels = 0.0, {"group": str(group), "replica": replica}
        self.pairs = 0


def level(t: float) -> float:
    """A step burst, a 30 s lull, then a burst that ramps up over 8 s."""
    if 30 <= t < 50:
        return 3.0
    return 1.0 + 2.0 * min(1.0, (t - 80) / 8) if 80 <= t < 100 else 1.0


def simulate(seconds: float = 120, dt: float = 2.0, seed: int = 0) -> tuple[list[Scrape], list[Scrape]]:
    """-> (the front door's scrapes, the same without the expert process: no busy time)."""
    rnd = random.Random(seed)
    att, exp = Telemetry("attention"), Telemetry("experts")
    routing = RoutingStats(torch.tensor([[e % 2 for e in range(EXPERTS)]] * LAYERS))
    att.routing_sources.add(routing)
    rpc = RpcInstruments.on(att.meter)
    busy = {g: [Busy(g, r) for r in rs] for g, rs in REPLICAS.items()}
    for b in (b for bs in busy.values() for b in bs):
        exp.busy_sources.add(b)
    mine, t0, out, no_busy = {"replica": "att-1"}, 1_700_000_000.0, [], []
    for i in range(int(seconds / dt) + 1):
        t = t0 + i * dt
        for g in (0, 1):
            demand = BASE[g] * level(i * dt) * rnd.uniform(0.95, 1.05) if i else 0.0
            pairs = round(demand * dt)
            # Skewed within the group too: its first expert gets two thirds, layer 0 a bit more.
            for layer, share in ((0, 0.55), (1, 0.45)):
                n_first = round(pairs * share * 2 / 3)
                counts = torch.tensor([n_first, round(pairs * share) - n_first])
                ids = torch.repeat_interleave(torch.tensor([g, g + 2]), counts).unsqueeze(1)
                routing.add(layer, ids)
            for b in busy[g]:
                b.busy_seconds += pairs / CAPACITY[g] / len(busy[g]) * rnd.uniform(0.97, 1.03)
                b.pairs += round(pairs / len(busy[g]))
                exp.busy.set(min(1.0, pairs / CAPACITY[g] / len(busy[g]) / dt), b.labels)
            # RPCs slow down once a replica is past half busy: what tune reads without busy time.
            lat = 0.002 * (1 + max(0.0, demand / len(busy[g]) / CAPACITY[g] - 0.5) * 8)
            for r in REPLICAS[g]:
                rpc.duration.record(lat, {"group": str(g), "replica": r})
                rpc.rows.record(64, {"group": str(g), "replica": r})
            att.routed_rate.set(demand, {"group": str(g), **mine})
            att.replicas.set(len(REPLICAS[g]), {"group": str(g), "state": "current"})
            att.replicas.set(len(REPLICAS[g]) + (g == 0), {"group": str(g), "state": "target"})
        running = 16 * level(i * dt)
        att.running.set(running, mine)
        att.waiting.set(4.0 if level(i * dt) > 1 else 0.0, mine)
        att.kv_usage.set(0.2 * level(i * dt), mine)
        att.ttft.record(0.05 * level(i * dt), {"gen_ai.request.model": "tiny"})
        att.tpot.record(0.02, {"gen_ai.request.model": "tiny"})
        att.requests.add(3, {"outcome": "stop"})
        if i == 10:
            att.requests.add(1, {"outcome": "error"})
        attention = metrics_gather.parse(att.text(), "attention-att-1")
        experts = metrics_gather.parse(exp.text(), "expert-g-all")
        out.append(Scrape(t, metrics_gather.render(metrics_gather.merge([attention, experts]))))
        no_busy.append(Scrape(t, metrics_gather.render(attention)))
    return out, no_busy


@pytest.fixture(scope="module")
def simulated() -> tuple[list[Scrape], list[Scrape]]:
    return simulate()


@pytest.fixture(scope="module")
def scrapes(simulated) -> list[Scrape]:
    return simulated[0]


def test_tune_finds_capacity_and_sizes_the_hot_group_larger(scrapes):
    p, reasons = propose(Recording(scrapes), utilization=0.7)
    g0, g1 = p.groups[0], p.groups[1]
    assert g0.max_replicas > g1.max_replicas
    for g, s in p.groups.items():
        assert s.target_tokens_per_s == pytest.approx(CAPACITY[g] * 0.7, rel=0.1)
        assert s.min_replicas <= s.max_replicas
        assert 0.1 <= s.hysteresis <= 0.4
        assert s.upscale_delay_s < s.downscale_delay_s
    # The gap between the two bursts is 30 s: scaling down must wait it out.
    assert g0.downscale_delay_s >= 30
    text = "\n".join(reasons)
    assert "group 0:" in text and "group 1:" in text and "attention:" in text
    assert "group 0: replayed through the policy: 1-3 replicas" in text
    assert p.attention.target_requests == pytest.approx(48 * 0.7, rel=0.1)
    assert p.groups_differ


def test_tune_cli_writes_yaml_that_decodes(scrapes, tmp_path, capsys):
    rec = tmp_path / "load.jsonl"
    rec.write_text("".join(json.dumps({"t": s.t, "metrics": s.text}) + "\n" for s in scrapes))
    out = tmp_path / "snippet.yaml"
    main(["tune", "--metrics", str(rec), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "group 0: target_tokens_per_s" in printed and "group 1: max_replicas" in printed
    cfg = app_config.decode(yaml.safe_load(out.read_text()))
    assert [g.experts for g in cfg.expert_groups] == [[0, 2], [1, 3]]
    assert cfg.expert_groups[0].scaling.max_replicas > cfg.expert_groups[1].scaling.max_replicas

    # Merged into an existing config: its other fields survive, the policy settings change.
    conf = tmp_path / "app.yaml"
    conf.write_text(yaml.safe_dump({"name": "mine", "groups": 2, "autoscaling": {"metrics_interval_s": 0.5}}))
    merged = tmp_path / "tuned.yaml"
    main(["tune", "--metrics", str(rec), "--config", str(conf), "--out", str(merged), "--utilization", "0.5"])
    cfg = app_config.load(merged)
    assert cfg.name == "mine" and cfg.autoscaling.metrics_interval_s == 0.5
    assert cfg.expert_groups[0].scaling.target_tokens_per_s == pytest.approx(CAPACITY[0] * 0.5, rel=0.1)


def test_tune_without_busy_time_falls_back_to_rpc_latency_and_says_so(simulated):
    p, reasons = propose(Recording(simulated[1]), utilization=0.7)
    assert any("no busy time" in r for r in reasons)
    assert p.groups[0].max_replicas >= p.groups[1].max_replicas
    app_config.decode({"autoscaling": {"experts": msgspec.to_builtins(p.experts)}})


class _Scrapes(http.server.BaseHTTPRequestHandler):
    texts: list[str] = []
    served = 0

    def do_GET(self):
        cls = type(self)
        body = cls.texts[min(cls.served, len(cls.texts) - 1)].encode()
        cls.served += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


@pytest.fixture
def app_metrics(scrapes):
    """A front door whose /metrics answers with successive scrapes, from the second burst."""
    handler = type("Handler", (_Scrapes,), {"texts": [s.text for s in scrapes[40:]], "served": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_top_once_shows_groups_replicas_and_heat_map(app_metrics, tmp_path, capsys):
    rec = tmp_path / "top.jsonl"
    main(["top", "--url", app_metrics, "--once", "--interval", "0.05", "--record", str(rec)])
    frame = capsys.readouterr().out
    lines = frame.splitlines()
    g0 = next(line for line in lines if line.startswith("g0 "))
    g1 = next(line for line in lines if line.startswith("g1 "))
    assert "2→3" in g0 and "1→1" in g1
    assert "10.0.0.1:7001" in frame and "10.0.0.3:7001" in frame
    assert "group  0101" in lines                     # expert e serves in group e % 2
    heat = lines[lines.index("group  0101") + 1:]
    assert [row.split()[0] for row in heat] == [str(layer) for layer in range(LAYERS)]
    assert all(len(row) == 7 + EXPERTS for row in heat) and "@" in heat[0]
    assert "TTFT p50" in frame and "errors 1" in frame

    written = [json.loads(line) for line in rec.read_text().splitlines()]
    assert len(written) == 2 and all(set(o) == {"t", "metrics"} for o in written)
    assert len(Recording.load(rec).windows()) == 1


def test_top_unreachable_url_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))             # held, never listening: a connection is refused, and no
        port = s.getsockname()[1]            # other process can take the port meanwhile
        r = subprocess.run([sys.executable, "-m", "cluster.tools.cli", "top", "--url", f"http://127.0.0.1:{port}",
                            "--once"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"cannot reach http://127.0.0.1:{port}/metrics" in r.stderr and "Traceback" not in r.stderr
