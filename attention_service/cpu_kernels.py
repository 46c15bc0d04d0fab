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

The extension is built on first use (mixtral/native.py: for this machine's CPU, into the
moe-serve cache). Where it cannot be built, or with MOE_SERVE_CPU_KERNELS=0, the torch path
runs instead and gives the same results to rounding.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mixtral import native

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (_CSRC / "paged_decode.cpp", _CSRC / "paged_prefill.cpp", _CSRC / "fused.cpp", _CSRC / "ops.cpp")


@functools.cache
def _ops():
    """torch.ops.moe_serve once the library is built and loaded, else None."""
    return torch.ops.moe_serve if native.load("moe_serve_attention", _SOURCES, "attention") else None


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
