"""Kernels of our own for the CPU path, compiled from attention_service/csrc/ on first use.

Two attention kernels that read the paged KV cache in place, and fused small ops of the
decode step (csrc/fused.cpp: RMSNorm; rope with the K/V cache writes), for fp32 on CPU:
- decode (csrc/paged_decode.cpp): torch's path copies every decoding context out of its
  blocks before attending to it; on CPU that copy and the per-bucket calls cost as much as
  the attention itself.
- prompt chunks (csrc/paged_prefill.cpp): torch's flash kernel runs at about a third of
  the CPU's fp32 peak on the model's shapes, and a chunk after cached tokens needs those
  tokens gathered out of their blocks and two calls merged.
- fused ops: a single stream's decode step does microseconds of math per op, and torch's
  dispatch and allocations around each of the norm's and rope's dozen ops per layer cost more.

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

from mixtral.config import CACHE

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "paged_decode.cpp", _CSRC / "paged_prefill.cpp", _CSRC / "fused.cpp", _CSRC / "ops.cpp"]


def _cache_dir() -> Path:
    # -march=native ties the build to this CPU; a cache shared by different machines keeps one each.
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    # The sources too: a changed kernel is built afresh rather than over the old one. And where
    # they live: the build records their paths, so two checkouts sharing a folder would take
    # turns rebuilding it.
    code = b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()) if p.suffix in (".cpp", ".h"))
    where = f"{platform.machine()} {cpu} {torch.__version__} {_CSRC}"
    tag = hashlib.sha256(where.encode() + code).hexdigest()[:12]
    return CACHE / "kernels" / f"attention-{tag}"


@functools.cache
def _ops():
    """torch.ops.moe_serve once the library is built and loaded, else None."""
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels off (MOE_SERVE_CPU_KERNELS=0): attention uses torch's path")
        return None
    try:
        from torch.utils.cpp_extension import load

        build = _cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        fresh = not any(build.glob("*.so"))
        if fresh:
            log.info("building the CPU attention kernels for this machine (once, about 30 s) in %s", build)
        t0 = time.perf_counter()
        # Loaded as a library of torch ops: torch.ops.moe_serve.*.
        load(name="moe_serve_attention", sources=[str(p) for p in _SOURCES], build_directory=str(build),
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        if fresh:
            log.info("built the CPU attention kernels in %.0f s", time.perf_counter() - t0)
        return torch.ops.moe_serve
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU attention kernels unavailable, using torch's path instead: %s", e)
        return None


def _applies(dtype: torch.dtype, device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and dtype == torch.float32


def paged_decode_attention(dtype: torch.dtype, device: torch.device | str):
    """The kernel for a model of this dtype and device, or None where it does not apply.

    The returned function: (q [B, H, Dh], k_cache, v_cache [S, KVH, Dh], tables [B, NB] int64,
    lens [B] int64, block_size, scale) -> out [B, H, Dh].
    """
    ops = _ops() if _applies(dtype, device) else None
    return ops.paged_decode_attention if ops is not None else None


def paged_prefill_attention(dtype: torch.dtype, device: torch.device | str):
    """The prompt kernel for a model of this dtype and device, or None where it does not apply.

    The returned function: (q [T, H, Dh], k_cache, v_cache [S, KVH, Dh], tables [C, NB], starts [C],
    qlens [C], lens [C] (all int64), block_size, scale) -> out [T, H, Dh]. Chunk c is the rows
    starts[c] .. starts[c] + qlens[c] of q, the last positions of a context of lens[c] tokens
    whose K/V (its own included) are in the cache at tables[c]; each row attends causally.
    """
    ops = _ops() if _applies(dtype, device) else None
    return ops.paged_prefill_attention if ops is not None else None


def fused_ops(dtype: torch.dtype, device: torch.device | str):
    """torch.ops.moe_serve for the fused per-layer ops (csrc/fused.cpp: rms_norm, qkv_rope_cache)
    where they apply (fp32 on CPU, the library built), else None."""
    return _ops() if _applies(dtype, device) else None
