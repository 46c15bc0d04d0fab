"""The engine against llama.cpp on the same fp32 model: one stream, and a batch of streams.

What it measures
    The "bench" preset (hidden 512, 4 layers, 8 experts top-2, vocab 32000), fp32 on both
    sides: our engine in this process (experts in-process, the default EngineConfig) and
    llama.cpp's `llama-batched-bench` on the GGUF converted from the same checkpoint, both
    on the machine's cores. Every request: a 128-token prompt (--prompt), 256 new tokens
    (--new), greedy, EOS ignored; prefix caching off, so every run prefills as llama.cpp's does.
      single   one request alone
      batch    --batch requests (default 32) submitted together
    Our side runs twice: as configured by default, where greedy steps take their tokens from
    the lm_head's int8 or bf16 screen and an fp32 check (mixtral/greedy.py: the same tokens as every
    fp32 logit), and with `greedy_screen` off, every fp32 logit computed as llama.cpp does.
    Figure per side: output tokens / wall time from submission to the last token (prompt
    processing included, as llama-batched-bench's total time), median of --repeats runs; the
    two sides take turns run by run, so a shared machine's slow spells fall on both alike.
    Ratios ours / llama.cpp: single (target >= 1.0) and batch (must stay >= 2.0), and the
    same without the screen.

llama.cpp
    Built on first use from the source tarball inside the `llama-cpp-python` package on PyPI
    (its vendored llama.cpp, CPU only, -march=native), under the moe-serve cache folder, with
    cmake and the machine's C++ compiler (several minutes on 2 cores, logged); the GGUF is
    written there by llama.cpp's own `convert_hf_to_gguf.py`. Later runs reuse both.

Run
    .venv/bin/python -m bench.vs_llama_cpp            # about 4 minutes once llama.cpp is built
    .venv/bin/python -m bench.vs_llama_cpp --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from bench import common
from cluster.local import build_engine
from mixtral.config import CACHE

LLAMA_CPP_PYTHON = "0.3.36"             # its sdist vendors the llama.cpp this is measured against
HOME = CACHE / "llama.cpp"
TARGET_SINGLE, FLOOR_BATCH = 1.0, 2.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, a batch of 4, one repeat")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, help="new tokens per request (default 256)")
    ap.add_argument("--batch", type=int, help="requests in the batch (default 32)")
    ap.add_argument("--repeats", type=int, help="runs per side (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: every core)")
    ap.add_argument("--out", default="vs_llama_cpp.json", help="file name under bench/out/")
    a = ap.parse_args()
    a.new = a.new or (16 if a.quick else 256)
    a.batch = a.batch or (4 if a.quick else 32)
    a.repeats = a.repeats or (1 if a.quick else 3)
    return a


def log(msg: str) -> None:
    print(msg, flush=True)


# --- llama.cpp: built once, from PyPI's source tarball ---------------------------------------
def llama_cpp() -> Path:
    """The llama.cpp source folder with llama-batched-bench built in build/bin."""
    src = HOME / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "build" / "bin" / "llama-batched-bench").exists():
        return src
    HOME.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        log(f"vs_llama_cpp: fetching llama-cpp-python {LLAMA_CPP_PYTHON}'s source tarball into {HOME}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(HOME)], check=True)
        with tarfile.open(HOME / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as t:
            t.extractall(HOME, filter="data")
    log("vs_llama_cpp: building llama.cpp (CPU, -march=native); several minutes on 2 cores")
    t0 = time.perf_counter()
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], cwd=src, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "llama-batched-bench"],
                   cwd=src, check=True, stdout=subprocess.DEVNULL)
    log(f"vs_llama_cpp: built llama.cpp in {time.perf_counter() - t0:.0f} s")
    return src


def gguf(src: Path, ckpt: Path) -> Path:
    out = HOME / f"{ckpt.name}-f32.gguf"
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f32",
                        "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def llama_run(src: Path, model: Path, a, parallel: int) -> dict:
    """One llama-batched-bench run: its JSON line (t = total seconds, tg = new tokens per sequence)."""
    ctx = parallel * (a.prompt + a.new) + 64
    r = subprocess.run([str(src / "build" / "bin" / "llama-batched-bench"), "-m", str(model), "-c", str(ctx),
                        "-b", "2048", "-ub", "512", "-npp", str(a.prompt), "-ntg", str(a.new), "-npl", str(parallel),
                        "-t", str(a.threads), "--output-format", "jsonl"],
                       capture_output=True, text=True, check=True)
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


# --- ours ------------------------------------------------------------------------------------
def ours_run(aeng: AsyncEngine, prompts: list[list[int]], new: int, loop) -> float:
    """Output tokens/s from submission to the last token, every request at once."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    async def run() -> float:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(aeng.complete(p, params) for p in prompts))
        assert all(len(o.token_ids) == new for o in outs)
        return len(prompts) * new / (time.perf_counter() - t0)
    return loop.run_until_complete(run())


def main() -> int:
    a = parse_args()
    result: dict = {"args": vars(a), "machine": common.announce_machine("vs_llama_cpp")}
    ckpt = common.checkpoint("bench")
    src = llama_cpp()
    model = gguf(src, ckpt)
    prompts = common.random_prompts(a.batch, a.prompt, a.prompt, 32000, seed=0)
    # Every run prefills its prompts, as llama-batched-bench does: the same prompts run after
    # run would otherwise come from the prefix cache (bench/prefix.py measures that).
    loop = asyncio.new_event_loop()
    engines = {}
    for screen in (True, False):
        engine, tok = build_engine(ckpt, EngineConfig(prefix_caching=False, greedy_screen=screen))
        engines[screen] = AsyncEngine(engine, tok)
        ours_run(engines[screen], prompts[:2], 8, loop)                # warm-up: kernels, allocator
    log(f"vs_llama_cpp workload: prompt {a.prompt} tokens, {a.new} new tokens, greedy; batch {a.batch}; "
        f"llama.cpp threads {a.threads}, torch threads {torch.get_num_threads()}; repeats {a.repeats}")
    for name, n in (("single", 1), ("batch", a.batch)):
        # Run by run in turn, so that a shared machine's slow spells fall on both sides alike.
        ours, plain, theirs = [], [], []
        for _ in range(a.repeats):
            ours.append(ours_run(engines[True], prompts[:n], a.new, loop))
            plain.append(ours_run(engines[False], prompts[:n], a.new, loop))
            theirs.append(n * a.new / llama_run(src, model, a, n)["t"])
        o, p, t = statistics.median(ours), statistics.median(plain), statistics.median(theirs)
        target = f"target >= {TARGET_SINGLE}" if n == 1 else f"must stay >= {FLOOR_BATCH}"
        runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)                  # noqa: E731
        log(f"vs_llama_cpp {name}: ours {o:.1f} output tokens/s (runs {runs(ours)}), llama.cpp {t:.1f} "
            f"(runs {runs(theirs)}); ratio {o / t:.2f} ({target})")
        log(f"vs_llama_cpp {name}, greedy screen off: ours {p:.1f} output tokens/s (runs {runs(plain)}); "
            f"ratio {p / t:.2f}")
        result[name] = {"ours": ours, "ours_screen_off": plain, "llama_cpp": theirs, "ratio": o / t,
                        "ratio_screen_off": p / t}
    for aeng in engines.values():
        loop.run_until_complete(aeng.close())
    log(f"vs_llama_cpp wrote {common.write_json(a.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
