"""The operator's dashboard, defined once: a Grafana dashboard and the built-in /dashboard page.

`PANELS` names each view with its PromQL for Grafana; the panels marked `page` are also
drawn by the front door's own page (titles and units from here), which computes the same
figures from the gathered /metrics without a Prometheus (cluster/observe/dashboard_data.py).

    python -m cluster.observe.dashboard --write     # regenerate the chart's dashboards/moe-serve.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from cluster.observe.dashboard_data import summarize
from cluster.observe.metrics_gather import Family

CHART_DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "moe-serve" / "dashboards" / "moe-serve.json"
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    kind: str                  # timeseries | matrix (layer x expert table) | gauge
    queries: tuple[Query, ...]
    unit: str                  # a Grafana unit id
    section: str
    width: int = 12
    height: int = 8
    page: bool = False         # also on the built-in page
    description: str = ""


# Request outcomes that did not end in tokens: failed, refused as bad, shed (429), unserved (503).
FAILED = "error|rejected|overloaded|unavailable"


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    keys = f"{by}, le" if by else "le"
    who = f"{{{{{by}}}}} " if by else ""
    return tuple(Query(f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket[{RATE}])))",
                       f"{who}p{int(q * 100)}") for q in (0.5, 0.99))


EXPERTS, REQUESTS = "Routing and expert groups", "Requests"
PANELS: tuple[Panel, ...] = (
    Panel("heatmap", "Routing heat map: layer × expert", "matrix",
          (Query("sum by (layer, expert) (rate(moe_serve_router_routed_tokens_total[1m]))"),),
          "suffix: pairs/s", EXPERTS, 24, 10, True,
          "Routed (token, expert) pairs per second over the last minute. A hot column is an expert "
          "that many layers favour; its group is the one that needs replicas."),
    Panel("demand", "Routed pairs/s per expert group (demand)", "timeseries",
          (Query("sum by (group) (moe_serve_router_routed_tokens_rate_per_second)", "group {{group}}"),),
          "suffix: pairs/s", EXPERTS, page=True,
          description="What the autoscaling policy divides by the target pairs/s per replica."),
    Panel("replicas", "Expert replicas per group: current vs target", "timeseries",
          (Query('max by (group) (moe_serve_expert_replicas{state="current"})', "group {{group}} current"),
           Query('max by (group) (moe_serve_expert_replicas{state="target"})', "group {{group}} target")),
          "short", EXPERTS, page=True),
    Panel("busy", "Expert busy fraction per group (mean over replicas)", "timeseries",
          (Query("avg by (group) (moe_serve_expert_busy)", "group {{group}}"),),
          "percentunit", EXPERTS, page=True),
    Panel("rpc", "Expert RPC latency per group", "timeseries",
          _quantiles("moe_serve_expert_rpc_duration_seconds", "group"), "s", EXPERTS, page=True),
    Panel("rows", "Rows per expert RPC per group", "timeseries",
          _quantiles("moe_serve_expert_batch_rows", "group"), "short", EXPERTS),
    Panel("wire", "Expert RPC bytes/s per group", "timeseries",
          (Query(f"sum by (group, direction) (rate(moe_serve_wire_bytes_total[{RATE}]))",
                 "group {{group}} {{direction}}"),), "Bps", EXPERTS, 24),
    Panel("ttft", "Time to first token", "timeseries",
          _quantiles("gen_ai_server_time_to_first_token_seconds"), "s", REQUESTS, 8, page=True),
    Panel("tpot", "Time per output token", "timeseries",
          _quantiles("gen_ai_server_time_per_output_token_seconds"), "s", REQUESTS, 8, page=True),
    Panel("duration", "Request duration", "timeseries",
          _quantiles("gen_ai_server_request_duration_seconds"), "s", REQUESTS, 8),
    Panel("tokens", "Tokens/s", "timeseries",
          (Query(f'sum(rate(gen_ai_client_token_usage_sum{{gen_ai_token_type="output"}}[{RATE}]))', "output"),
           Query(f'sum(rate(gen_ai_client_token_usage_sum{{gen_ai_token_type="input"}}[{RATE}]))', "input")),
          "suffix: tok/s", REQUESTS, 8, page=True),
    Panel("queue", "Running / waiting requests", "timeseries",
          (Query("sum(moe_serve_requests_running)", "running"), Query("sum(moe_serve_requests_waiting)", "waiting")),
          "short", REQUESTS, 8, page=True),
    Panel("kv", "KV cache use", "gauge",
          (Query("avg(moe_serve_kv_cache_usage)", "mean"), Query("max(moe_serve_kv_cache_usage)", "fullest replica")),
          "percentunit", REQUESTS, 8, page=True),
    Panel("prefix", "Prefix cache hit rate", "timeseries",
          (Query(f"sum(rate(moe_serve_prefix_cache_hit_tokens_total[{RATE}])) / "
                 f"sum(rate(moe_serve_prefix_cache_queried_tokens_total[{RATE}]))", "tokens"),
           Query(f"sum(rate(moe_serve_prefix_cache_hit_blocks_total[{RATE}])) / "
                 f"sum(rate(moe_serve_prefix_cache_queried_blocks_total[{RATE}]))", "full blocks")),
          "percentunit", REQUESTS, 8, page=True,
          description="Share of prompt tokens (and full blocks) whose KV came from the cache instead of a prefill."),
    Panel("evictions", "Cache evictions and preemptions/s", "timeseries",
          (Query(f"sum(rate(moe_serve_prefix_cache_evictions_total[{RATE}]))", "evicted blocks"),
           Query(f"sum(rate(moe_serve_preemptions_total[{RATE}]))", "preempted sequences")),
          "short", REQUESTS, 8, page=True,
          description="Evictions: cached blocks reused for new work. Preemptions: sequences sent back to wait "
                      "(and recomputed) because the KV cache was full."),
    Panel("errors", "Failed, rejected, shed (429) and unserved (503) requests/s", "timeseries",
          (Query(f'sum by (outcome) (rate(moe_serve_requests_total{{outcome=~"{FAILED}"}}[{RATE}]))',
                 "{{outcome}}"),), "reqps", REQUESTS, 12, page=True),
    Panel("outcomes", "Requests/s by outcome", "timeseries",
          (Query(f"sum by (outcome) (rate(moe_serve_requests_total[{RATE}]))", "{{outcome}}"),),
          "reqps", REQUESTS, 12),
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    instant = p.kind in ("matrix", "gauge")
    targets = [{"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend or "__auto",
                "refId": chr(ord("A") + i), "instant": instant, "range": not instant,
                "format": "table" if p.kind == "matrix" else "time_series"} for i, q in enumerate(p.queries)]
    defaults: dict = {"unit": p.unit, "color": {"mode": "palette-classic"}}
    if p.unit == "percentunit":
        defaults.update(min=0, max=1)
    out = {"id": pid, "type": {"matrix": "table"}.get(p.kind, p.kind), "title": p.title,
           "description": p.description, "datasource": DATASOURCE, "targets": targets,
           "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
           "fieldConfig": {"defaults": defaults, "overrides": []}, "options": {}}
    if p.kind == "timeseries":
        defaults["custom"] = {"lineWidth": 2, "fillOpacity": 8, "showPoints": "never", "spanNulls": True}
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
        # Target drawn dashed so that it reads as the goal the current count moves toward.
        out["fieldConfig"]["overrides"] = [{"matcher": {"id": "byRegexp", "options": ".*target"},
                                            "properties": [{"id": "custom.lineStyle",
                                                            "value": {"fill": "dash", "dash": [10, 10]}}]}]
    elif p.kind == "gauge":
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                {"color": "orange", "value": 0.8},
                                                                {"color": "red", "value": 0.95}]}
        defaults["color"] = {"mode": "thresholds"}
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "showThresholdLabels": False, "showThresholdMarkers": True}
    elif p.kind == "matrix":
        # Layers as rows and experts as columns, numbered, each cell coloured by its rate.
        defaults.update(color={"mode": "continuous-BlPu"}, decimals=1,
                        custom={"align": "center", "cellOptions": {"type": "color-background", "mode": "gradient"}})
        out["transformations"] = [
            {"id": "convertFieldType", "options": {"conversions": [
                {"targetField": "layer", "destinationType": "number"},
                {"targetField": "expert", "destinationType": "number"}]}},
            {"id": "sortBy", "options": {"sort": [{"field": "expert", "desc": False}]}},
            {"id": "groupingToMatrix", "options": {"rowField": "layer", "columnField": "expert",
                                                   "valueField": "Value", "emptyValue": "zero"}}]
        out["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False},
                          "sortBy": [{"displayName": "layer\\expert", "desc": False}]}
    return out


def grafana_dashboard(panels: tuple[Panel, ...] = PANELS) -> dict:
    """The Grafana dashboard (JSON model) the Helm chart ships as a ConfigMap."""
    out, y, x, row_h, pid, section = [], 0, 0, 0, 1, None
    for p in panels:
        if p.section != section:
            y, x, row_h, section = y + row_h, 0, 0, p.section
            out.append({"id": pid, "type": "row", "title": section, "collapsed": False, "panels": [],
                        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            pid, y = pid + 1, y + 1
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append(_panel_json(p, pid, x, y))
        pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
    return {
        "uid": "moe-serve", "title": "moe-serve", "tags": ["moe-serve"], "schemaVersion": 39, "version": 1,
        "editable": True, "graphTooltip": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "timepicker": {}, "timezone": "", "links": [], "id": None,
        "description": "Routing load, expert group replicas and request latency of a moe-serve app.",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
                                 "regex": "", "options": [], "includeAll": False, "multi": False}]},
        "panels": out,
    }


def dashboard_text(dashboard: dict | None = None) -> str:
    return json.dumps(grafana_dashboard() if dashboard is None else dashboard, indent=2,
                      sort_keys=True, ensure_ascii=False) + "\n"


def write(path: Path = CHART_DASHBOARD) -> Path:
    path.write_text(dashboard_text(), encoding="utf-8")
    return path


# --- what the queries read ---------------------------------------------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "atan2", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(dashboard: dict) -> set[str]:
    """The series names every query of a Grafana dashboard reads (e.g. `..._bucket`)."""
    names = set()
    for expr in _exprs(dashboard):
        bare = _STRING.sub('""', expr)
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", _CLAUSE.sub(" ", bare))
        for m in _IDENT.finditer(bare):
            follows = bare[m.end():].lstrip()[:1]
            if follows != "(" and m.group(0).lower() not in _KEYWORDS and not bare[m.start() - 1:m.start()].isdigit():
                names.add(m.group(0))
    return names


def label_names(expr: str) -> set[str]:
    """Labels a query matches or aggregates on."""
    bare = _STRING.sub('""', expr)
    out = {l for _, ls in _CLAUSE.findall(bare) for l in re.split(r"\s*,\s*", ls.strip()) if l}
    for body in re.findall(r"\{([^}]*)\}", bare):
        out.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    return out


# --- the built-in page -------------------------------------------------------------------
Gather = Callable[[], Awaitable[tuple[dict[str, Family], dict]]]


def page_panels() -> dict[str, dict]:
    return {p.key: {"title": p.title, "unit": p.unit, "description": p.description} for p in PANELS if p.page}


def add_dashboard_routes(app: FastAPI, gather: Gather, min_window_s: float = 1.0) -> None:
    """GET /dashboard (the page) and GET /dashboard/data (its figures, from `gather()`:
    the gathered families and the autoscaling policy's last report)."""
    html = resources.files("cluster.observe").joinpath("dashboard.html").read_text(encoding="utf-8")
    html = html.replace("/*PANELS*/{}", json.dumps(page_panels(), ensure_ascii=False))
    # Earlier gathers to take rates against: the newest at least `min_window_s` old, so that
    # pages polling at once from several tabs do not divide by a few milliseconds.
    history: deque[tuple[float, dict[str, Family]]] = deque(maxlen=64)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data() -> JSONResponse:
        families, report = await gather()
        now = time.monotonic()
        while len(history) > 1 and now - history[1][0] >= min_window_s:
            history.popleft()
        base = history[0] if history and now - history[0][0] >= max(min_window_s, 1e-3) else None
        history.append((now, families))
        out = summarize(families, base[1] if base else None, now - base[0] if base else None, report or {})
        return JSONResponse({**out, "time": time.time()})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cluster.observe.dashboard", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {CHART_DASHBOARD.name} into the Helm chart")
    args = ap.parse_args(argv)
    if args.write:
        print(f"wrote {write()}")
    else:
        print(dashboard_text(), end="")


if __name__ == "__main__":
    main()
