"""The greedy screen of the lm_head against every fp32 logit and their argmax, row count by row count.

What it measures
    The greedy token of M rows of x through the "bench" preset's lm_head [32000, 512] (random
    weights, fp32, on CPU), two ways: the screen of mixtral/greedy.py (int8 logits for up to 6
    rows, bf16 for more, a bound, the candidates' panels again in fp32) and what a step computes without it (the panel
    matmul of every logit, mixtral/linear.py, then the argmax kernel of csrc/fused.cpp).
    Each side cycles through enough copies of the weights that every call streams them from
    memory, as a decode step does. Per M: the median time of --repeats calls per side, the
    sides taking turns call by call, the ratio (every logit / screen: above 1, the screen is
    faster) and whether both gave the same tokens on every call.

Run
    .venv/bin/python -m bench.greedy_screen            # about a minute
    .venv/bin/python -m bench.greedy_screen --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from attention_service import cpu_kernels
from bench import common
from mixtral import greedy, linear

V, D = 32000, 512
STREAM_BYTES = 96 << 20     # weights cycled: above the 32 MB L3 of the machines we measure on


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one copy, few rows and calls")
    ap.add_argument("--rows", type=int, nargs="+", help="row counts (default 1 2 4 8 16 32 64)")
    ap.add_argument("--repeats", type=int, help="calls per side per row count (default 40)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    ap.add_argument("--out", default="greedy_screen.json", help="file name under bench/out/")
    a = ap.parse_args()
    a.rows = a.rows or ([1, 32] if a.quick else [1, 2, 4, 8, 16, 32, 64])
    a.repeats = a.repeats or (3 if a.quick else 40)
    return a


def main() -> int:
    a = parse_args()
    torch.set_num_threads(a.threads)
    result: dict = {"args": vars(a), "machine": common.announce_machine("greedy_screen"), "figures": []}
    fused = cpu_kernels.fused_ops(torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    heads = []
    for _ in range(1 if a.quick else max(2, STREAM_BYTES // (V * D * 4))):
        packed = linear.pack_linear(torch.randn(V, D, generator=g) * 0.02)
        heads.append((packed, greedy.pack_greedy(packed)))
    if heads[0][1] is None or fused is None:
        print("greedy_screen: the screen does not run here (fp32 CPU with AVX-512 BF16 and a compiler)")
        return 1
    for M in a.rows:
        x = torch.randn(M, D, generator=g)
        sides = {"screen": lambda h: greedy.greedy_tokens(x, h[1]),
                 "every_logit": lambda h: fused.argmax_rows(linear.linear(x, h[0]))}
        times: dict[str, list[float]] = {s: [] for s in sides}
        same = True
        for i in range(a.repeats + 1):
            out = {}
            for side, fn in sides.items():
                t0 = time.perf_counter()
                out[side] = fn(heads[i % len(heads)])
                if i:                                   # the first call of each side warms up
                    times[side].append(time.perf_counter() - t0)
            same &= torch.equal(out["screen"], out["every_logit"])
        med = {s: statistics.median(ts) for s, ts in times.items()}
        fig = {"rows": M, **{f"{s}_ms": round(t * 1e3, 4) for s, t in med.items()},
               "ratio": med["every_logit"] / med["screen"], "same_tokens": same}
        result["figures"].append(fig)
        print(f"greedy_screen rows={M}: screen {med['screen'] * 1e3:.3f} ms, every logit "
              f"{med['every_logit'] * 1e3:.3f} ms; ratio every/screen {fig['ratio']:.2f}x; same tokens: {same}",
              flush=True)
    print(f"greedy_screen wrote {common.write_json(a.out, result)}")
    return 0 if all(f["same_tokens"] for f in result["figures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
