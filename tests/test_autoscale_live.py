"""Expert groups scaling on observed routing load, on the live app (CPU), with its telemetry.

The checkpoint's routers favour experts 0, 2, 4, 6 (group 0 of two round-robin groups)
so strongly that about 98% of the routed pairs go to group 0. The per-replica target sits
between the two groups' demand, with a wide margin on either side, however fast the machine
runs: group 0 must scale up, group 1 must stay at its minimum, and group 0 must come back
down when the load stops, with no request failing on the way. The same run checks /metrics
and a request's trace.
"""

import json
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from ray import serve

from cluster.observe.dashboard import grafana_dashboard, metric_names
from cluster.tools.harness import running_app
from mixtral.config import preset
from mixtral.random_checkpoint import write_random_checkpoint

pytestmark = pytest.mark.e2e   # starts a Ray cluster and the whole app

MAX = 3


def running_replicas(name: str) -> int:
    d = serve.status().applications["moe-serve"].deployments[name]
    return d.replica_states.get("RUNNING", 0)


class Load:
    """Closed-loop streaming clients; every finished stream's outcome is kept."""

    def __init__(self, url: str, clients: int = 6):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id
        self.stop = threading.Event()
        self.done: list[str] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                finish, tokens = None, 0
                for chunk in self.client.completions.create(
                        model=self.model, prompt=f"client {i} request {n}: tell me about the sea", max_tokens=48,
                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    tokens += 1
                    finish = chunk.choices[0].finish_reason or finish
                if finish != "length" or tokens < 48:
                    self.errors.append(f"client {i}: finish {finish} after {tokens} chunks")
                self.done.append(finish)
            except Exception as e:  # noqa: BLE001 - every failure is a finding here
                self.errors.append(f"client {i}: {type(e).__name__}: {e}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        return r.read().decode()


def group_demand(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("moe_serve_router_routed_tokens_rate_per_second{"):
            group = line.split('group="')[1].split('"')[0]
            out[group] = out.get(group, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def skewed_app(tmp_path_factory):
    ckpt = write_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("skewed"), favour_experts=[0, 2, 4, 6],
                                   favour=0.6)
    traces = tmp_path_factory.mktemp("traces")
    config = {
        "groups": 2,
        # The demand in all is what the machine allows: a few hundred pairs/s on a loaded 2-core
        # host, a few thousand on a quiet one. Group 0 gets ~98% of it, so a target of 150
        # scales group 0 and never group 1 anywhere between ~160 and ~7,000 pairs/s.
        "autoscaling": {"experts": {"min_replicas": 1, "max_replicas": MAX, "target_tokens_per_s": 150,
                                    "upscale_delay_s": 2, "downscale_delay_s": 6, "hysteresis": 0.2,
                                    "max_busy": 1.0},
                        "metrics_interval_s": 0.5, "look_back_period_s": 2},
        "telemetry": {"trace_sample_ratio": 0.3, "trace_dir": str(traces)},
    }
    with running_app(ckpt, **config) as (cfg, url, _):
        yield url, traces


def test_skewed_load_scales_the_busy_group_only_and_back(skewed_app):
    url, traces = skewed_app
    seen = {"ExpertGroup-0": [], "ExpertGroup-1": []}
    demand = {}
    with Load(url) as load:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for name in seen:
                seen[name].append(running_replicas(name))
            if seen["ExpertGroup-0"][-1] >= 2 and len(load.done) >= 12:
                break
            time.sleep(0.5)
        demand = group_demand(scrape(url))
        metrics_under_load = scrape(url)
        with urllib.request.urlopen(f"{url}/dashboard/data", timeout=30) as r:
            page = json.loads(r.read())
        time.sleep(3)                   # the new replica takes rows
        for name in seen:
            seen[name].append(running_replicas(name))
    assert max(seen["ExpertGroup-0"]) >= 2, f"group 0 never scaled up: {seen}; demand {demand}"
    assert max(seen["ExpertGroup-1"]) == 1, f"group 1 left its minimum: {seen}; demand {demand}"
    assert demand.get("0", 0) > 10 * demand.get("1", 0), demand
    assert not load.errors, load.errors[:5]
    assert len(load.done) >= 12

    # The load is gone: group 0 returns to its minimum.
    deadline = time.monotonic() + 90
    while running_replicas("ExpertGroup-0") > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert running_replicas("ExpertGroup-0") == 1
    assert running_replicas("ExpertGroup-1") == 1

    # Every process's metrics at the front door, with the documented names and labels.
    for name, labels in [
            ("moe_serve_router_routed_tokens_total", ("layer", "expert", "group")),
            ("moe_serve_router_routed_tokens_rate_per_second", ("group",)),
            ("moe_serve_expert_replicas", ("group", "state")),
            ("moe_serve_expert_busy", ("group", "replica")),
            ("moe_serve_expert_busy_time_seconds_total", ("group", "replica")),
            ("moe_serve_expert_pairs_total", ("group", "replica")),
            ("moe_serve_expert_rpc_duration_seconds_bucket", ("group", "replica", "le")),
            ("moe_serve_expert_batch_rows_bucket", ("group", "replica")),
            ("moe_serve_wire_bytes_total", ("group", "direction")),
            ("moe_serve_kv_cache_usage", ("replica",)),
            ("moe_serve_requests_running", ("replica",)),
            ("moe_serve_requests_waiting", ("replica",)),
            ("moe_serve_requests_total", ("outcome",)),
            ("gen_ai_server_time_to_first_token_seconds_bucket", ("gen_ai_request_model", "le")),
            ("gen_ai_server_time_per_output_token_seconds_bucket", ("le",)),
            ("gen_ai_server_request_duration_seconds_bucket", ("le",)),
            ("gen_ai_client_token_usage_bucket", ("gen_ai_token_type", "le"))]:
        lines = [l for l in metrics_under_load.splitlines() if l.startswith(name + "{")]
        assert lines, f"{name} missing from /metrics"
        assert all(f'{k}="' in lines[0] for k in (*labels, "process")), (name, lines[0])
    assert 'state="target"' in metrics_under_load

    # Every series the Grafana dashboard queries is one the live app exports.
    exported = {l.split("{")[0].split(" ")[0] for l in metrics_under_load.splitlines() if l and l[0] != "#"}
    assert not metric_names(grafana_dashboard()) - exported, metric_names(grafana_dashboard()) - exported
    # The built-in page's data shows the same picture: the heat map leans to group 0.
    per_group = page["heatmap"]["per_group"]
    assert per_group["0"] > 2 * per_group["1"], per_group
    assert {str(g["group"]) for g in page["groups"]} >= {"0", "1"}

    # A traced request: front door span -> engine steps -> expert RPCs -> expert compute,
    # written by three kinds of process, joined by one trace id.
    spans = [json.loads(l) for f in Path(traces).glob("spans-*.jsonl") for l in f.read_text().splitlines()]
    by_trace: dict[str, list[dict]] = {}
    for s in spans:
        by_trace.setdefault(s["context"]["trace_id"], []).append(s)
    full = [t for t in by_trace.values()
            if {"moe_serve.request", "moe_serve.engine.step", "moe_serve.expert.forward",
                "moe_serve.expert.compute"} <= {s["name"] for s in t}]
    assert full, f"no trace reaches the experts; span names seen: {sorted({s['name'] for s in spans})}"
    t = full[0]
    ids = {s["context"]["span_id"]: s for s in t}
    for s in t:
        if s["name"] == "moe_serve.expert.compute":
            assert ids[s["parent_id"]]["name"] == "moe_serve.expert.forward"
        if s["name"] == "moe_serve.expert.forward":
            assert ids[s["parent_id"]]["name"] == "moe_serve.engine.step"
    services = {s["resource"]["attributes"]["service.name"] for s in t}
    assert {"moe-serve-frontend", "moe-serve-attention", "moe-serve-experts"} <= services
