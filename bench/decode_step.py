"""Where a decode step goes (a single stream's, or --batch's): torch ops dispatched and time per step.

What it measures
    The "bench" preset in this process (experts in-process, the default EngineConfig), one
    request (--batch of them) of a 128-token prompt decoding --new tokens greedily, and per
    decode step (once every prompt is in):
      ops      torch ops dispatched (torch.profiler, every aten/mkldnn/moe_serve op counted)
      cpu_ms   this process's CPU time per step, median (with one torch thread: less moved
               by other processes' load than wall time, which a shared machine makes noisy)
      wall_ms  wall time per step, median
    for one of our CPU kernels on and off, alternating run by run in the one process; the
    ratio off / on is the figure. Tokens must come out the same both ways.
      --compare fused    the fused small ops (attention_service/csrc/fused.cpp) against torch's
      --compare panels   the panel matmul for a few rows (mixtral/csrc/panel_linear.cpp)
                         against oneDNN's

Run
    .venv/bin/python -m bench.decode_step            # about a minute
    .venv/bin/python -m bench.decode_step --threads 2
    .venv/bin/python -m bench.decode_step --compare panels --threads 2
    .venv/bin/python -m bench.decode_step --compare panels --threads 2 --batch 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from bench import common
from cluster.local import build_engine
from mixtral import linear


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="new tokens per run (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together (default 1)")
    ap.add_argument("--compare", choices=("fused", "panels"), default="fused",
                    help="the kernel to switch on and off (default: fused)")
    ap.add_argument("--out", help="file name under bench/out/ (default decode_step_<compare>.json)")
    return ap.parse_args()


def one_run(engine, loop, prompts: list[list[int]], new: int, prof: bool = False):
    """-> (output ids, per decode step: [(cpu s, wall s)] or the profiler's op count)."""
    seqs = [engine.add(p, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)) for p in prompts]
    while any(s.num_output == 0 for s in seqs):                  # the prompts
        loop.run_until_complete(engine.step())
    left = new - min(s.num_output for s in seqs)
    if prof:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            while engine.has_work:
                loop.run_until_complete(engine.step())
        return [s.output_ids for s in seqs], sum(e.count for e in p.key_averages()) / left
    steps = []
    while engine.has_work:
        c0, t0 = time.process_time(), time.perf_counter()
        loop.run_until_complete(engine.step())
        steps.append((time.process_time() - c0, time.perf_counter() - t0))
    return [s.output_ids for s in seqs], steps


def main() -> int:
    a = parse_args()
    torch.set_num_threads(a.threads)
    result: dict = {"args": vars(a), "machine": common.announce_machine("decode_step")}
    engine, _ = build_engine(common.checkpoint("bench"), EngineConfig())
    if a.compare == "fused":
        fused = engine.model.fused
        sides = {"on": lambda: setattr(engine.model, "fused", fused),
                 "off": lambda: setattr(engine.model, "fused", None)}
    else:
        fused = linear.SMALL_ROWS if isinstance(engine.model.lm_head, linear.Packed) else None
        sides = {"on": lambda: setattr(linear, "SMALL_ROWS", fused), "off": lambda: setattr(linear, "SMALL_ROWS", 0)}
    if fused is None:
        print(f"decode_step: the {a.compare} CPU kernels do not apply here (no compiler, or not fp32 on CPU)")
        return 1
    prompts = common.random_prompts(a.batch, 128, 128, 32000, seed=0)
    loop = asyncio.new_event_loop()
    steps: dict[str, list] = {s: [] for s in sides}
    tokens: dict[str, list] = {}
    one_run(engine, loop, prompts, 8)                            # warm-up
    for _ in range(a.repeats):
        for side, switch in sides.items():
            switch()
            tokens[side], st = one_run(engine, loop, prompts, a.new)
            steps[side] += st
    for side, switch in sides.items():
        switch()
        _, count = one_run(engine, loop, prompts, 17, prof=True)
        cpu = statistics.median(c for c, _ in steps[side]) * 1e3
        wall = statistics.median(w for _, w in steps[side]) * 1e3
        result[side] = {"ops": count, "cpu_ms": round(cpu, 3), "wall_ms": round(wall, 3)}
        print(f"decode_step {a.compare} {side}: {count:.0f} ops, {cpu:.2f} ms CPU, {wall:.2f} ms wall per step "
              f"(median of {len(steps[side])} steps, {a.threads} thread(s))", flush=True)
    on, off = result["on"], result["off"]
    result["same_tokens"] = tokens["on"] == tokens["off"]
    print(f"decode_step {a.compare} ratio off/on: ops {off['ops'] / on['ops']:.2f}x, "
          f"CPU {off['cpu_ms'] / on['cpu_ms']:.2f}x, wall {off['wall_ms'] / on['wall_ms']:.2f}x; "
          f"same tokens: {result['same_tokens']}")
    common.write_json(a.out or f"decode_step_{a.compare}.json", result)
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
