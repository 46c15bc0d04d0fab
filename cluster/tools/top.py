"""`moe-serve top`: the live routing and replica picture in a terminal.

    moe-serve top --url http://127.0.0.1:8000 --interval 2 --record load.jsonl

Polls the front door's /metrics and redraws one frame per interval: requests and latency
over the last interval, then per expert group its replicas (current→target), the routed
demand and what each replica carries, and a layer x expert heat map of where tokens went.
Rates need two scrapes, so the first frame appears one interval after start. The recording
`--record` writes is what `moe-serve tune --metrics FILE` reads.
"""

from __future__ import annotations

import sys
import time

from cluster.observe import recording
from cluster.observe.names import ROUTED
from cluster.observe.recording import ScrapeError, Window

SHADES = " .:-=+*#%@"
CLEAR = "\x1b[H\x1b[2J"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _is_error(labels: dict) -> bool:
    return labels.get("outcome") == "error"


def requests_lines(w: Window) -> list[str]:
    cur = w.cur
    running = sum(cur.gauge("moe_serve_requests_running", ("process", "replica")).values())
    waiting = sum(cur.gauge("moe_serve_requests_waiting", ("process", "replica")).values())
    kv = list(cur.gauge("moe_serve_kv_cache_usage", ("process", "replica")).values())
    kv_text = f"{100 * sum(kv) / len(kv):.0f}%" if kv else "-"
    errors = sum(v for _, v in cur.series("moe_serve_requests_total", _is_error).values())
    new_errors = sum(w.delta("moe_serve_requests_total", where=_is_error).values())
    done = sum(w.delta("moe_serve_requests_total").values())
    lat = []
    for label, hist in (("TTFT", "gen_ai_server_time_to_first_token_seconds"),
                        ("TPOT", "gen_ai_server_time_per_output_token_seconds")):
        p50, p99 = (w.quantile(hist, q).get(()) for q in (0.5, 0.99))
        lat.append(f"{label} p50 {_ms(p50)} p99 {_ms(p99)}")
    return [f"requests  running {running:.0f}  waiting {waiting:.0f}  done {done / w.dt:.1f}/s  "
            f"errors {errors:.0f} (+{new_errors:.0f})  KV cache {kv_text}",
            f"latency   {'   '.join(lat)}"]


def groups_block(w: Window) -> list[str]:
    demand = {g: v for (g,), v in w.rate(ROUTED, ("group",)).items()}
    reps = w.cur.gauge("moe_serve_expert_replicas", ("group", "state"))
    busy = w.cur.gauge("moe_serve_expert_busy", ("group", "replica"))
    p99 = w.quantile("moe_serve_expert_rpc_duration_seconds", 0.99, ("group", "replica"))
    p99_group = w.quantile("moe_serve_expert_rpc_duration_seconds", 0.99, ("group",))
    rows = w.rate("moe_serve_expert_batch_rows_sum", ("group", "replica"))
    groups = sorted({g for g in demand} | {g for g, _ in reps} | {g for g, _ in busy}, key=_group_order)
    out = [f"{'group':<6}{'replicas':>9}  {'demand pairs/s':>14}  {'per replica':>11}  {'busy':>5}  {'rpc p99':>8}"]
    for g in groups:
        current, target = reps.get((g, "current")), reps.get((g, "target"))
        shown = f"{_count(current)}→{_count(target)}"
        d = demand.get(g, 0.0)
        per = _n(d / current) if current else "-"
        mine = [r for gg, r in sorted(set(busy) | set(rows) | set(p99)) if gg == g]
        b = [busy[(g, r)] for r in mine if (g, r) in busy]
        b_text = f"{sum(b) / len(b):.2f}" if b else "-"
        out.append(f"{'g' + g:<6}{shown:>9}  {_n(d):>14}  {per:>11}  {b_text:>5}  "
                   f"{_ms(p99_group.get((g,))):>8}")
        for r in mine:
            b_r = busy.get((g, r))
            out.append(f"    {r:<28} rows/s {_n(rows.get((g, r), 0.0)):>8}  "
                       f"busy {'-' if b_r is None else f'{b_r:.2f}'}  p99 {_ms(p99.get((g, r)))}")
    return out


def _group_order(g: str):
    return (0, int(g)) if g.isdigit() else (1, g)


def _count(x: float | None) -> str:
    return "?" if x is None else f"{x:.0f}"


def heat_map(w: Window) -> list[str]:
    rates = w.rate(ROUTED, ("layer", "expert"))
    if not rates:
        return ["routing: no routed tokens reported yet"]
    layers = sorted({int(l) for l, _ in rates})
    experts = sorted({int(e) for _, e in rates})
    top = max(rates.values())
    out = [f"routing heat map: pairs/s, a row per layer, a column per expert ('{SHADES}' up to {_n(top)}/s)",
           "expert " + "".join(str(e % 10) for e in experts)]
    group_of = {}
    for labels, _ in w.cur.series(ROUTED).values():
        group_of.setdefault(labels.get("expert"), set()).add(labels.get("group"))
    # Whole experts per group: one row says which group serves each column.
    if all(len(gs) == 1 for gs in group_of.values()):
        out.append("group  " + "".join(next(iter(group_of.get(str(e), {"?"})))[-1:] for e in experts))
    for layer in layers:
        cells = []
        for e in experts:
            v = rates.get((str(layer), str(e)), 0.0)
            # Any traffic at all shows as at least the faintest mark, so a cold expert stands out.
            i = 0 if top <= 0 or v <= 0 else max(1, round(v / top * (len(SHADES) - 1)))
            cells.append(SHADES[i])
        out.append(f"{layer:>5}  " + "".join(cells))
    return out


def frame(w: Window, url: str) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(w.cur.t))
    lines = [f"moe-serve top   {url}   {when}   over the last {w.dt:.1f}s", *requests_lines(w), "",
             *groups_block(w), "", *heat_map(w)]
    return "\n".join(lines)


def cmd_top(a) -> None:
    url = recording.metrics_url(a.url)
    try:
        prev = recording.scrape(url, a.record)
    except ScrapeError as e:
        sys.exit(f"moe-serve top: {e}")
    try:
        while True:
            time.sleep(a.interval)
            try:
                cur = recording.scrape(url, a.record)
            except ScrapeError as e:
                if a.once:
                    sys.exit(f"moe-serve top: {e}")
                # The app may be restarting: say so in place and keep polling.
                print(f"{CLEAR}moe-serve top   {time.strftime('%H:%M:%S')}   {e}", flush=True)
                continue
            text = frame(Window(prev, cur), url)
            if a.once:
                print(text, flush=True)
                return
            print(CLEAR + text, flush=True)
            prev = cur
    except KeyboardInterrupt:
        pass


def add_parser(sub) -> None:
    q = sub.add_parser(
        "top", help="live routing and replica picture of a running app, in the terminal",
        description="Poll the front door's /metrics and redraw, every --interval: requests running and waiting, "
                    "KV cache use, TTFT/TPOT p50 and p99 and errors over the interval; per expert group its "
                    "replicas (current→target), routed demand (pairs/s), load per replica, busy fraction and RPC "
                    "p99, each replica on its own line; and a layer x expert heat map of routed tokens. "
                    "--record appends every scrape to a JSON-lines file that `moe-serve tune --metrics` reads.")
    q.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the front door, or its /metrics URL (default: http://127.0.0.1:8000)")
    q.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default: 2)")
    q.add_argument("--record", metavar="FILE", help='append each scrape to FILE as {"t": ..., "metrics": ...} lines')
    q.add_argument("--once", action="store_true",
                   help="print one frame and exit (it takes two scrapes, --interval apart)")
    q.set_defaults(fn=cmd_top)
