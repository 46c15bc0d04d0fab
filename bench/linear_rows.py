"""The panel matmul against oneDNN, row count by row count, on the shapes of a decode step.

What it measures
    y = x @ W.T in fp32 on CPU for the "bench" preset's weights: the lm_head [32000, 512], an
    expert's stacked W1/W3 [2048, 512] and its W2 [512, 1024]; x of M rows for each --rows.
    Each side reads its own layout of the same weights (mixtral/linear.py: the panels of
    csrc/panel_linear.cpp, oneDNN's blocked layout), cycling through enough copies that every
    call streams its weights from memory, as a decode step does. Per (shape, M): the median
    time of --repeats calls per side, the two sides taking turns call by call, as GFLOP/s
    and the weights' GB/s, and the ratio oneDNN time / panel time (above 1: panels faster).
    `linear` takes the panels up to mixtral.linear.SMALL_ROWS rows; this is the figure that
    sets it.

Run
    .venv/bin/python -m bench.linear_rows            # about a minute
    .venv/bin/python -m bench.linear_rows --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench import common
from mixtral import linear

SHAPES = {"lm_head": (32000, 512), "expert_w13": (2048, 512), "expert_w2": (512, 1024)}
# Bytes of copies cycled per shape: above the 32 MB L3 of the machines we measure on.
STREAM_BYTES = 96 << 20


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small copies, few rows and calls")
    ap.add_argument("--rows", type=int, nargs="+", help="row counts (default 1 2 4 8 12 16 32 64 128)")
    ap.add_argument("--repeats", type=int, help="calls per side per row count (default 40)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    ap.add_argument("--out", default="linear_rows.json", help="file name under bench/out/")
    a = ap.parse_args()
    a.rows = a.rows or ([1, 8, 64] if a.quick else [1, 2, 4, 8, 12, 16, 32, 64, 128])
    a.repeats = a.repeats or (3 if a.quick else 40)
    return a


def main() -> int:
    a = parse_args()
    torch.set_num_threads(a.threads)
    result: dict = {"args": vars(a), "machine": common.announce_machine("linear_rows"), "figures": []}
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=g)
        if not isinstance(linear.pack_linear(w), linear.Packed):
            print("linear_rows: the panel kernel or oneDNN is not available here (fp32 CPU with a compiler)")
            return 1
        copies = [linear.pack_linear(w) for _ in range(1 if a.quick else max(2, STREAM_BYTES // (N * K * 4)))]
        for M in a.rows:
            x = torch.randn(M, K, generator=g)
            sides = {"panels": lambda p: torch.ops.moe_serve_linear.panel_linear(x, p.panels),
                     "onednn": lambda p: torch.ops.mkldnn._linear_pointwise(x, p.blocked, None, "none", [], "")}
            times: dict[str, list[float]] = {s: [] for s in sides}
            for i in range(a.repeats + 1):
                for side, fn in sides.items():
                    t0 = time.perf_counter()
                    fn(copies[i % len(copies)])
                    if i:                                   # the first call of each side warms up
                        times[side].append(time.perf_counter() - t0)
            med = {s: statistics.median(ts) for s, ts in times.items()}
            fig = {"shape": name, "rows": M, **{f"{s}_ms": round(t * 1e3, 4) for s, t in med.items()},
                   "ratio": med["onednn"] / med["panels"]}
            result["figures"].append(fig)
            rate = "; ".join(f"{s} {t * 1e3:.3f} ms, {2 * M * N * K / t / 1e9:.1f} GFLOP/s, "
                             f"{N * K * 4 / t / 1e9:.1f} GB/s" for s, t in med.items())
            print(f"linear_rows {name} [{N}, {K}] rows={M}: {rate}; ratio onednn/panels {fig['ratio']:.2f}x",
                  flush=True)
    print(f"linear_rows wrote {common.write_json(a.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
