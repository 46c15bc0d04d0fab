"""The GPU data path at Mixtral's real sizes: kernels against the GPU's own measured peaks.

What it measures (one H100/H200, random weights, within ~8 minutes)
    peaks      dense bf16 (and fp8) matmul TFLOP/s, 8192^3; HBM bandwidth, a 4 GiB copy
               (bytes read + written / time). Every ratio below is against these, same run.
    experts    one layer's 8 experts at true 8x22B (D 6144, F 16384) and 8x7B (4096, 14336)
               sizes, top-2 with every expert given R rows, R = 16, 64, 256, 1024, 4096;
               bf16 and fp8 weights (expert_service/experts.py as served, graphs included).
               TFLOP/s (6 D F per routed row) / the matching dense peak; at 16 rows, weight
               bytes read / time / HBM bandwidth (small batches are weight-bound).
    attention  decode over the paged cache at 64K context, 8 and 64 sequences, 8x22B heads
               (48 q / 8 kv, Dh 128, 16-token blocks, blocks shuffled): KV bytes / time / HBM
               bandwidth, and the same for the torch path it replaces (gather + masked SDPA).
    step       one engine decode step of 64 sequences at 8x22B dims with 2 layers: experts
               in-process vs over gRPC to a shard process on the same GPU, 1 and 2
               micro-batches, CUDA graphs on and off (the attention side's; the shard keeps its own on).
    tokens     greedy tokens of the bf16 GPU engine against the fp32 CPU engine on the
               "bench" checkpoint: tokens equal before the first difference (N), per prompt;
               and fp8 experts against bf16 on the GPU, the same way.

Prints one line per figure and writes everything as JSON (--out). `--smoke` runs the same
code on CPU at tiny sizes in well under a minute (tests/test_bench_gpu.py), so it never rots.

Run
    python -m bench.gpu                      # on a GPU machine (bench/gpu_device_run.sh)
    python -m bench.gpu --smoke              # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.gpu_parts import attention_figures, engine_step_figures, expert_figures, token_agreement

GiB = 1 << 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Seconds per call, mean over iters after warmup calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def peaks(device: torch.device, smoke: bool) -> dict:
    """The GPU's own dense matmul peak (bf16, fp8 where it runs) and HBM bandwidth."""
    n = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device, 3 if smoke else 10, 3)
    out = {"matmul_dtype": str(dtype).removeprefix("torch."), "matmul_tflops": 2 * n**3 / t / 1e12}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T
        one = torch.ones((), device=device)
        t8 = timeit(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), device,
                    3 if smoke else 10, 3)
        out["fp8_matmul_tflops"] = 2 * n**3 / t8 / 1e12
    except (RuntimeError, NotImplementedError) as e:
        out["fp8_matmul_tflops"], out["fp8_matmul_error"] = None, str(e).splitlines()[0]
    size = (64 << 20) if smoke else 4 * GiB
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, 3 if smoke else 10, 2)
    out["hbm_gb_s"] = 2 * size / t / 1e9
    return out


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"gpu": p.name, "sms": p.multi_processor_count, "gpu_memory_gib": round(p.total_memory / GiB, 1),
                 "cuda": torch.version.cuda, "driver": _driver()}
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _driver() -> str | None:
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code in seconds")
    p.add_argument("--out", default=None, help="write the figures as JSON here (default: bench/out/gpu.json)")
    p.add_argument("--budget-s", type=float, default=450, help="skip what is left past this (default: 450)")
    p.add_argument("--only", default="peaks,experts,attention,step,tokens",
                   help="comma-separated sections to run (default: all)")
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.smoke:
        print("no CUDA device: run with --smoke for the CPU run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report: dict = {"machine": machine(device), "smoke": a.smoke}
    print("machine", json.dumps(report["machine"]), flush=True)
    sections = a.only.split(",")
    failed = []
    work = Path(tempfile.mkdtemp(prefix="moe-serve-bench-gpu-"))
    for name, run in [("peaks", lambda: peaks(device, a.smoke)),
                      ("experts", lambda: expert_figures(device, a.smoke, report.get("peaks", {}))),
                      ("attention", lambda: attention_figures(device, a.smoke, report.get("peaks", {}))),
                      ("step", lambda: engine_step_figures(device, a.smoke, work)),
                      ("tokens", lambda: token_agreement(device, a.smoke, work))]:
        if name not in sections:
            continue
        if time.perf_counter() - t0 > a.budget_s:
            print(f"{name}: skipped, past the {a.budget_s:.0f} s budget", flush=True)
            report[name] = {"skipped": "budget"}
            continue
        s0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception as e:   # one section's failure must not lose the others' figures
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - s0:.1f} s", flush=True)
        if name == "peaks":
            print("peaks", json.dumps(report[name]), flush=True)
    report["seconds"] = time.perf_counter() - t0
    pk = report.get("peaks") or {}
    if "matmul_tflops" in pk:
        # The yardsticks `moe-serve plan --forecast --gpu-json` reads (cluster/tools/forecast.py).
        report.update(gpu=report["machine"].get("gpu", str(device)), matmul_peak_tflops=pk["matmul_tflops"],
                      hbm_gbps=pk["hbm_gb_s"])
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "out" / ("gpu-smoke.json" if a.smoke else
                                                                                 "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"done in {report['seconds']:.0f} s; {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
