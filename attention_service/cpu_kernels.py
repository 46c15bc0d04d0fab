"""Kernels of our own for the CPU path, compiled from attention_service/csrc/ on first use.

One so far: decode attention that reads the paged KV cache in place (csrc/paged_decode.cpp).
torch's path copies every decoding context out of its blocks before attending to it; on
CPU that copy and the per-bucket calls cost as much as the attention itself.

The extension is built with torch's JIT builder (a C++ compiler and ninja), for this
machine's CPU (-march=native), into the moe-serve cache ($MOE_SERVE_CACHE, default
~/.cache/moe-serve): about half a minute the first time on a machine, then loaded from
there. Where it cannot be built, or with MOE_SERVE_CPU_KERNELS=0, the torch path runs
instead and gives the same results to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

from cluster.config import CACHE

log = logging.getLogger(__name__)

_SRC = Path(__file__).resolve().parent / "csrc" / "paged_decode.cpp"


def _cache_dir() -> Path:
    # -march=native ties the build to this CPU; a cache shared by different machines keeps one each.
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    tag = hashlib.sha256(f"{platform.machine()} {cpu} {torch.__version__}".encode()).hexdigest()[:12]
    return CACHE / "kernels" / f"paged_decode-{tag}"


@functools.cache
def _op():
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels off (MOE_SERVE_CPU_KERNELS=0): decode attention uses torch's path")
        return None
    try:
        from torch.utils.cpp_extension import load

        build = _cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        fresh = not any(build.glob("*.so"))
        if fresh:
            log.info("building the CPU decode attention kernel for this machine (once, about 30 s) in %s", build)
        t0 = time.perf_counter()
        # Loaded as a library of torch ops: torch.ops.moe_serve.paged_decode_attention.
        load(name="moe_serve_paged_decode", sources=[str(_SRC)], build_directory=str(build),
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        if fresh:
            log.info("built the CPU decode attention kernel in %.0f s", time.perf_counter() - t0)
        return torch.ops.moe_serve.paged_decode_attention
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU decode attention kernel unavailable, using torch's path instead: %s", e)
        return None


def paged_decode_attention(dtype: torch.dtype, device: torch.device | str):
    """The kernel for a model of this dtype and device, or None where it does not apply.

    The returned function: (q [B, H, Dh], k_cache, v_cache [S, KVH, Dh], tables [B, NB] int64,
    lens [B] int64, block_size, scale) -> out [B, H, Dh].
    """
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    return _op()
