"""CUDA graphs for work whose shapes repeat: pad the rows to a bucket, capture once per
(key, bucket), replay after. Both services use it: the attention side per layer segment of
a decode step, the expert side per (layer, rows) of a batch.

Shapes: N rows (sequences or tokens), Nb the bucket N is padded to.

A decode step launches a few dozen small kernels per layer; on a GPU their launch costs
more than their work at small batches. A captured graph replays them in one launch. The
graph fixes every shape and address, so the caller pads its rows up to a bucket (a handful
of sizes serve every batch) with rows that change nothing it reads back, and copies each
step's inputs into the graph's own input tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

# Row counts a graph is captured for: dense where batches are small (padding costs
# a larger share there), then in steps of ~1.5x.
BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def enabled(wanted: bool, device: torch.device | str) -> bool:
    """Graphs run only on CUDA, only when wanted, and never under MOE_SERVE_CUDA_GRAPHS=0
    (the switch for processes that have no config of their own, e.g. a shard on the command line)."""
    return wanted and torch.device(device).type == "cuda" and os.environ.get("MOE_SERVE_CUDA_GRAPHS", "1") != "0"


def bucket_for(n: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket holding n rows; None when n is past the largest (run eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def pad_rows(x: torch.Tensor, rows: int, fill: float | int = 0) -> torch.Tensor:
    """x [N, ...] -> [rows, ...]: x then rows - N rows of `fill`."""
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), fill)
    return torch.cat([x, pad])


class GraphCache:
    """fn(*inputs) -> outputs, captured per key on CUDA and replayed; called directly elsewhere.

    Every capture shares one memory pool. Replays write into the graph's own outputs, so
    `run` returns copies: a caller may hold them while the same graph replays for another
    micro-batch."""

    def __init__(self, device: torch.device | str, wanted: bool = True):
        self.capture = enabled(wanted, device)
        self.graphs: dict = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, key, fn: Callable, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if not self.capture:
            return tuple(fn(*inputs))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(fn, inputs)
        graph, static_in, static_out = entry
        for s, x in zip(static_in, inputs):
            s.copy_(x, non_blocking=True)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _capture(self, fn: Callable, inputs: Sequence[torch.Tensor]):
        static_in = [x.clone() for x in inputs]
        # One eager run on a side stream first, as torch asks: it sets up lazily built state
        # (cuBLAS handles, Triton kernels compiled for these shapes) outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = tuple(fn(*static_in))
        self._pool = graph.pool()
        log.debug("captured a CUDA graph (%d graphs)", len(self.graphs) + 1)
        return graph, static_in, static_out
