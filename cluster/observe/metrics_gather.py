"""The whole app's metrics at one address: the front door's /metrics gathers every process's.

Each attention and expert process serves its own /metrics (listed in the endpoint
directory). Gathering parses them, adds a `process` label so that series of different
processes never collide, and writes one exposition with each family's HELP and TYPE once.
The same parsed samples feed the built-in dashboard, `moe-serve top` and `moe-serve tune`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("moe-serve.metrics")


@dataclass
class Family:
    name: str
    type: str
    documentation: str
    unit: str
    samples: list[Sample]


def parse(text: str, process: str | None = None) -> dict[str, Family]:
    """Exposition text -> families by name; `process` is added to every sample's labels."""
    out: dict[str, Family] = {}
    for f in text_string_to_metric_families(text):
        samples = [s._replace(labels={**s.labels, "process": process}) if process else s for s in f.samples]
        out[f.name] = Family(f.name, f.type, f.documentation, f.unit, samples)
    return out


def merge(parts: list[dict[str, Family]]) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for part in parts:
        for name, f in part.items():
            if name in out:
                out[name].samples.extend(f.samples)
            else:
                out[name] = Family(f.name, f.type, f.documentation, f.unit, list(f.samples))
    return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render(families: dict[str, Family]) -> str:
    lines = []
    for f in families.values():
        kind = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram"}.get(f.type, f.type)
        # The text format names a counter's family as its samples are named, with `_total`
        # (the parser drops the suffix from the family's name).
        head = f"{f.name}_total" if kind == "counter" else f.name
        lines.append(f"# HELP {head} {f.documentation}")
        lines.append(f"# TYPE {head} {kind}")
        for s in f.samples:
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in s.labels.items())
            lines.append(f"{s.name}{{{labels}}} {_value(s.value)}" if labels else f"{s.name} {_value(s.value)}")
    return "\n".join(lines) + "\n"


async def fetch(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> str | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None          # a process that just went away: its series drop out


async def gather(own: tuple[str, str], targets: dict[str, str]) -> dict[str, Family]:
    """own: (process name, this process's text); targets: process -> /metrics URL."""
    async with aiohttp.ClientSession() as session:
        texts = await asyncio.gather(*(fetch(session, u) for u in targets.values()))
    parts = [parse(own[1], own[0])]
    for process, text in zip(targets, texts):
        if text is not None:
            parts.append(parse(text, process))
    return merge(parts)


def samples(families: dict[str, Family], name: str) -> list[Sample]:
    """Every sample whose series name is `name` (e.g. `..._bucket`, `..._total`)."""
    return [s for f in families.values() for s in f.samples if s.name == name]
