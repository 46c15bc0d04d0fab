"""Scrapes of the app's /metrics over time, and the rates and quantiles read from them.

`moe-serve top` and `moe-serve tune` read the front door's /metrics, where every process's
samples carry a `process` label. A recording is JSON lines, one object per scrape:

    {"t": 1718000000.0, "metrics": "<Prometheus exposition text>"}

Counters and histograms are cumulative, so everything said about an interval comes from
the difference between two scrapes (a `Window`), series by series: a process that
restarted starts its counters again from zero, and one that appeared between the scrapes
has no earlier value to subtract.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cluster.observe.dashboard_data import histogram_quantile, increase

Key = tuple[str, ...]
# The routing load, as the front door's /metrics names it: what `top` and `tune` read most.


class ScrapeError(RuntimeError):
    """The metrics could not be read: an unreachable URL or a file that is not a recording."""


def metrics_url(url: str) -> str:
    """The front door's address or its /metrics URL -> the /metrics URL."""
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url        # host:port, as people type it
    return url if url.endswith("/metrics") else url + "/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"{url} answered HTTP {e.code}; is this the moe-serve front door?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ScrapeError(f"cannot reach {url} ({reason}); is the app up (`moe-serve up`)?") from None


def append(path: str | Path, t: float, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps({"t": t, "metrics": text}) + "\n")
    except OSError as e:
        raise ScrapeError(f"cannot write {path}: {e.strerror}") from None


def scrape(url: str, record: str | None = None) -> Scrape:
    """One scrape of `url`, also appended to the `record` file when given."""
    t, text = time.time(), fetch(url)
    if record:
        append(record, t, text)
    return Scrape(t, text)


@dataclass
class Scrape:
    t: float
    text: str

    @cached_property
    def by_name(self) -> dict[str, list[Sample]]:
        # Keyed by sample name, not family: the parser splits a counter whose TYPE line
        # names it without `_total` into one untyped family per sample, all named alike.
        out: dict[str, list[Sample]] = {}
        for f in text_string_to_metric_families(self.text):
            for s in f.samples:
                out.setdefault(s.name, []).append(s)
        return out

    def series(self, name: str, where: Callable[[dict], bool] | None = None) -> dict[tuple, tuple[dict, float]]:
        """Samples named `name` -> {series identity: (labels, value)}."""
        out = {}
        for s in self.by_name.get(name, ()):
            if where is None or where(s.labels):
                out[tuple(sorted(s.labels.items()))] = (s.labels, s.value)
        return out

    def gauge(self, name: str, by: Iterable[str] = (),
              where: Callable[[dict], bool] | None = None) -> dict[Key, float]:
        """Latest gauge values grouped by the `by` labels, the largest where several share a
        group: several attention processes publish the same replica counts, and they must not
        be added up."""
        groups: dict[Key, list[float]] = {}
        for labels, v in self.series(name, where).values():
            groups.setdefault(tuple(labels.get(b, "") for b in by), []).append(v)
        return {k: max(vs) for k, vs in groups.items()}


@dataclass
class Window:
    """What happened between two scrapes."""

    prev: Scrape
    cur: Scrape

    @property
    def dt(self) -> float:
        return max(self.cur.t - self.prev.t, 1e-9)

    def delta(self, name: str, by: Iterable[str] = (), where: Callable[[dict], bool] | None = None
              ) -> dict[Key, float]:
        """Increase of a cumulative series over the window, summed by the `by` labels; a series
        seen for the first time counts nothing (its total predates the window)."""
        cur = [s for s in self.cur.by_name.get(name, ()) if where is None or where(s.labels)]
        out: dict[Key, float] = {}
        for ident, d in increase(cur, self.prev.by_name.get(name, ())).items():
            labels = dict(ident)
            key = tuple(labels.get(b, "") for b in by)
            out[key] = out.get(key, 0.0) + d
        return out

    def rate(self, name: str, by: Iterable[str] = (), where: Callable[[dict], bool] | None = None
             ) -> dict[Key, float]:
        return {k: v / self.dt for k, v in self.delta(name, by, where).items()}

    def quantile(self, hist: str, q: float, by: Iterable[str] = (),
                 where: Callable[[dict], bool] | None = None) -> dict[Key, float]:
        """The q-quantile of a histogram's observations made within the window, as
        Prometheus' histogram_quantile reads buckets (linear within a bucket)."""
        by = tuple(by)
        buckets = self.delta(f"{hist}_bucket", (*by, "le"), where)
        per: dict[Key, list[tuple[float, float]]] = {}
        for key, n in buckets.items():
            per.setdefault(key[:-1], []).append((float(key[-1]), n))
        return {k: v for k, bs in per.items() if (v := histogram_quantile(q, bs)) is not None}


class Recording:
    """Scrapes in time order, from a JSON-lines file or made in memory."""

    def __init__(self, scrapes: Iterable[Scrape]):
        self.scrapes = sorted(scrapes, key=lambda s: s.t)

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        scrapes = []
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ScrapeError(f"{path}: {e.strerror}") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                scrapes.append(Scrape(float(obj["t"]), str(obj["metrics"])))
            except (ValueError, KeyError, TypeError):
                raise ScrapeError(f'{path}:{i}: not a recording line {{"t": ..., "metrics": "..."}}') from None
        return cls(scrapes)

    def windows(self) -> list[Window]:
        return [Window(a, b) for a, b in zip(self.scrapes, self.scrapes[1:]) if b.t > a.t]

    @property
    def duration(self) -> float:
        return self.scrapes[-1].t - self.scrapes[0].t if self.scrapes else 0.0
