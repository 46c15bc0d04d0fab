"""Reading a load time series for `moe-serve tune`: levels, noise, bursts, and the load
at which latency grows. Plain numbers in, plain numbers out (see cluster/tools/tune.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Median |x_i - x_(i-1)| of independent normal noise with deviation σ is this times σ.
MAD_OF_DIFFERENCES = 0.6745 * math.sqrt(2)


def percentile(values: list[float], q: float, empty: float = 0.0) -> float:
    """The q-th percentile (0-100), linear between the closest ranks as numpy's default; `empty` if none."""
    if not values:
        return empty
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    i = int(pos)
    return xs[i] if i + 1 >= len(xs) else xs[i] + (xs[i + 1] - xs[i]) * (pos - i)


@dataclass(frozen=True)
class Stats:
    p10: float
    p50: float
    p90: float
    peak: float
    mean: float
    noise: float        # σ of the scrape-to-scrape noise, not of the bursts


def stats(values: list[float]) -> Stats:
    diffs = [abs(b - a) for a, b in zip(values, values[1:])]
    # From successive differences: a burst moves the level only at its two edges, so the
    # median difference is the noise's, where the plain deviation would be the bursts'.
    noise = percentile(diffs, 50) / MAD_OF_DIFFERENCES if diffs else 0.0
    return Stats(percentile(values, 10), percentile(values, 50), percentile(values, 90),
                 max(values, default=0.0), sum(values) / len(values) if values else 0.0, noise)


def rise_times(times: list[float], values: list[float], low: float, high: float) -> list[float]:
    """For each burst (a run above `low` that reaches `high`): seconds from the last sample
    at or below `low` to the first within a tenth of the burst's peak, i.e. its 10-90 rise
    on a scale from `low` to the peak. A step shows as one scrape interval."""
    out, i = [], 1
    while i < len(values):
        if values[i] > low and values[i - 1] <= low:
            j = i
            while j < len(values) and values[j] > low:
                j += 1
            run = values[i:j]
            peak = max(run)
            if peak >= high:
                mark = low + 0.9 * (peak - low)
                reach = next(k for k in range(i, j) if values[k] >= mark)
                out.append(times[reach] - times[i - 1])
            i = j
        else:
            i += 1
    return out


def burst_gaps(times: list[float], need: list[int], baseline: int) -> list[float]:
    """Seconds between the end of one burst (a run needing more than `baseline` replicas)
    and the start of the next."""
    gaps, last_burst, in_gap = [], None, False
    for t, n in zip(times, need):
        if n > baseline:
            if in_gap and last_burst is not None:
                gaps.append(t - last_burst)
            last_burst, in_gap = t, False
        elif last_burst is not None:
            in_gap = True
    return gaps


def knee_load(loads: list[float], latencies: list[float], growth: float = 2.0) -> tuple[float | None, bool]:
    """The per-replica load beyond which mean RPC latency exceeds `growth` x its light-load
    value -> (load, True); when it never does, (the highest load seen, False).

    Loads are binned in tenths so one slow interval does not make a knee."""
    if not loads:
        return None, False
    pairs = sorted(zip(loads, latencies))
    size = max(1, len(pairs) // 10)
    bins = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    median = [percentile([lat for _, lat in b], 50) for b in bins]
    light = median[0]
    for i, m in enumerate(median[1:], 1):
        if light > 0 and m >= growth * light:
            return bins[i - 1][-1][0], True
    return pairs[-1][0], False
