"""`moe-serve tune` on the command line: read the load, print the reasoning and the YAML.

The method is in cluster/tools/tune.py. The YAML is an `autoscaling:` block and, when the groups
want different settings, `expert_groups` with each group's own `scaling`; with --config it
is that file with the proposal merged in. Either way it decodes as an app config before
it is printed or written.
"""

from __future__ import annotations

import sys
import time

import msgspec
import yaml

from cluster.observe import recording
from cluster.observe.recording import Recording, ScrapeError
from cluster.serve import app_config
from cluster.tools.tune import Proposal, propose


def sample(url: str, duration: float, interval: float) -> Recording:
    """Scrape the live app for `duration` seconds (progress on stderr)."""
    url = recording.metrics_url(url)
    n = max(3, round(duration / interval) + 1)
    scrapes, start = [], time.monotonic()
    for i in range(n):
        scrapes.append(recording.scrape(url))
        print(f"\rsampling {url}: {i + 1}/{n} scrapes", end="", file=sys.stderr, flush=True)
        if i + 1 < n:
            time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
    print(file=sys.stderr)
    return Recording(scrapes)


def read(source: str, duration: float, interval: float) -> Recording:
    if source.startswith(("http://", "https://")):
        return sample(source, duration, interval)
    return Recording.load(source)


class _Dumper(yaml.SafeDumper):
    """Lists of expert and layer ids on one line, as people write them."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, (dict, list)) for x in v)))


def _plain(s) -> dict:
    return msgspec.to_builtins(s)


def group_specs(p: Proposal, raw: dict, reasons: list[str]) -> list[dict] | None:
    """expert_groups with each group's scaling: the config's own list, or the layout the
    recording shows (what `groups: N` dealt) when the config has none."""
    if raw.get("expert_groups"):
        specs = [dict(g) for g in raw["expert_groups"]]
        for g, s in p.groups.items():
            if g < len(specs):
                specs[g]["scaling"] = _plain(s)
        reasons.append("groups: their settings differ, so each of the config's expert_groups gets its own scaling")
        return specs
    all_layers = {layer for pairs in p.layout.values() for layer, _ in pairs}
    specs = []
    for g in sorted(p.groups):
        pairs = p.layout.get(g, set())
        experts, layers = sorted({e for _, e in pairs}), sorted({layer for layer, _ in pairs})
        if len(pairs) != len(experts) * len(layers) or sorted(p.groups) != list(range(len(p.groups))):
            reasons.append("groups: their layout in the recording is not one `expert_groups` can state; "
                           "every group gets autoscaling.experts")
            return None
        spec = {"experts": experts, **({} if set(layers) == all_layers else {"layers": layers}),
                "replicas": p.groups[g].min_replicas, "scaling": _plain(p.groups[g])}
        specs.append(spec)
    reasons.append("groups: their settings differ, so each gets its own expert_groups[i].scaling, with the "
                   "experts each group served in the recording")
    return specs


def document(p: Proposal, raw: dict | None, reasons: list[str]) -> dict:
    """The YAML to print: the snippet alone, or the config `raw` with it merged in."""
    out = dict(raw or {})
    auto = dict(out.get("autoscaling") or {})
    auto["experts"], auto["attention"] = _plain(p.experts), _plain(p.attention)
    out["autoscaling"] = auto
    if p.groups_differ:
        reasons.append("autoscaling.experts: the cautious envelope of the groups (smallest target, widest "
                       "bounds, quickest up, slowest down), for any group without its own scaling")
        specs = group_specs(p, out, reasons)
        if specs is not None:
            out["expert_groups"] = specs
    elif raw and raw.get("expert_groups"):
        # One setting fits every group: a group's own scaling would override it.
        out["expert_groups"] = [{k: v for k, v in g.items() if k != "scaling"} for g in raw["expert_groups"]]
    app_config.decode(out, "the proposed config")
    return out


def cmd_tune(a) -> None:
    try:
        rec = read(a.metrics, a.duration, a.interval)
        raw, cfg = None, None
        if a.config:
            cfg = app_config.load(a.config)
            with open(a.config) as f:
                raw = yaml.safe_load(f) or {}
        proposal, reasons = propose(rec, a.utilization, cfg)
        doc = document(proposal, raw, reasons)
    except (ScrapeError, ValueError) as e:
        sys.exit(f"moe-serve tune: {e}")
    for line in reasons:
        print(line)
    text = (f"# proposed by `moe-serve tune` from {len(rec.scrapes)} scrapes over {rec.duration:.0f}s "
            f"at utilization {a.utilization:g}\n" + yaml.dump(doc, Dumper=_Dumper, sort_keys=False))
    print("\n" + text, end="")
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"wrote {a.out}", file=sys.stderr)


def add_parser(sub) -> None:
    q = sub.add_parser(
        "tune", help="propose autoscaling settings from recorded load, with the reasoning",
        description="Read recorded load (a `moe-serve top --record` file, or sample a running app's /metrics for "
                    "--duration seconds) and propose autoscaling settings for each expert group and for "
                    "attention: target tokens/s per replica from measured capacity x --utilization, min/max "
                    "replicas from the demand's p10 and peak, up/down delays from how fast bursts rise and how "
                    "long the gaps between them last, hysteresis from the demand's noise. Prints the reasoning "
                    "line by line, then the YAML (see cluster/tools/tune.py for the method).")
    q.add_argument("--metrics", required=True, metavar="URL|FILE",
                   help="the front door (http://host:8000) to sample, or a recording (JSON lines)")
    q.add_argument("--duration", type=float, default=60.0, help="seconds to sample a URL for (default: 60)")
    q.add_argument("--interval", type=float, default=2.0, help="seconds between samples of a URL (default: 2)")
    q.add_argument("--utilization", type=float, default=0.7,
                   help="busy fraction a replica should run at; the rest is headroom for bursts (default: 0.7)")
    q.add_argument("--config", metavar="app.yaml",
                   help="the app config now in use: its settings are kept where the load says nothing, and the "
                        "output is this whole file with the proposal merged in")
    q.add_argument("--out", metavar="FILE", help="also write the YAML to FILE")
    q.set_defaults(fn=cmd_tune)
