"""The matmul both sides of the model use: y = x @ W.T on weights prepared once at load.

Shapes: M rows, N output features, Kin input features.

It lives in `mixtral`, below both services, so the attention math and the expert math
share it without importing each other.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixtral import native

_PANEL_SRC = (Path(__file__).resolve().parent / "csrc" / "panel_linear.cpp",)
# Row counts up to here take the panel kernel: on a decode step's shapes it is ahead of
# oneDNN's blocked kernels up to 64 rows (bench/linear_rows.py); prompts keep oneDNN.
SMALL_ROWS = 64
_PANEL = 16                 # outputs per panel (csrc/panel_linear.cpp)


class Packed(NamedTuple):
    """An fp32 CPU weight in the two layouts `linear` picks between by row count."""
    blocked: torch.Tensor   # oneDNN's blocked layout, for more than SMALL_ROWS rows
    panels: torch.Tensor    # [N / 16, Kin, 16] for SMALL_ROWS rows or fewer


def _onednn_ok(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.cache
def _panels_built() -> bool:
    return native.load("moe_serve_linear", _PANEL_SRC, "matmuls of a few rows")


def pack_linear(w: torch.Tensor) -> torch.Tensor | Packed:
    """w [N, Kin] -> the weight `linear` takes.

    torch sends fp32 CPU matmuls to MKL, which runs well below oneDNN on the same shapes on
    the AMD EPYC we benchmark on (docs/benchmarks.md, engine against HF). oneDNN wants the
    weight reordered into its blocked layout, done once here, so the dense copy can be
    dropped. A decode step's few rows are another matter: there the time is that of
    streaming the weights from memory, and our panel kernel (csrc/panel_linear.cpp) streams
    them faster than oneDNN does; so where it is built and N is a multiple of 16 the weight
    is also kept in its panels, at twice the memory (MOE_SERVE_CPU_KERNELS=0 keeps one copy).
    Still fp32 throughout, only the order of the sums changes. Anything else is returned as
    is: bf16 already goes to oneDNN inside torch, and GPUs have their own BLAS.
    """
    if not _onednn_ok(w):
        return w
    blocked = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
    if w.dim() != 2 or w.shape[0] % _PANEL or not _panels_built():
        return blocked
    return Packed(blocked, torch.ops.moe_serve_linear.panel_pack(w))


# oneDNN builds a kernel for each new row count (about a millisecond), and a step
# of prompt chunks brings row counts never seen before to every matmul (the step's tokens,
# each expert's share). Row counts from _PAD_FROM up are rounded up to a multiple of
# _PAD_TO, so a few dozen kernels serve them all, at the price of at most _PAD_TO - 1
# padding rows (at most 12% more rows). Smaller counts (decode steps) repeat step after
# step and are left as they are.
_PAD_FROM, _PAD_TO = 128, 16


def linear(x: torch.Tensor, w: torch.Tensor | Packed) -> torch.Tensor:
    """x [M, Kin] (or [..., Kin] for unpacked weights), w from pack_linear -> x @ W.T [M, N]."""
    if isinstance(w, Packed):
        if x.shape[0] <= SMALL_ROWS:
            return torch.ops.moe_serve_linear.panel_linear(x, w.panels)
        w = w.blocked
    if w.is_mkldnn:
        M = x.shape[0]
        pad = -M % _PAD_TO if x.dim() == 2 and M >= _PAD_FROM else 0
        y = torch.ops.mkldnn._linear_pointwise(F.pad(x, (0, 0, 0, pad)) if pad else x, w, None, "none", [], "")
        return y[:M] if pad else y
    return F.linear(x, w)


def ffn_row(x: torch.Tensor, w13: torch.Tensor | Packed, w2: torch.Tensor | Packed, scale: float) -> torch.Tensor:
    """x [1, D] through one SwiGLU expert, times its routing weight -> [1, D]:
    gate, up = (x @ W13.T).chunk(2); scale * ((silu(gate) * up) @ W2.T). On panels it is one
    call (csrc/panel_linear.cpp) doing these same ops; the result is the same bits."""
    if isinstance(w13, Packed) and isinstance(w2, Packed) and x.shape[0] == 1:
        return torch.ops.moe_serve_linear.panel_ffn_row(x, w13.panels, w2.panels, scale)
    gate, up = linear(x, w13).chunk(2, dim=-1)
    # scale: a Python float, which torch multiplies an fp32 tensor by in fp32.
    return linear(F.silu(gate) * up, w2) * scale


def ffn(x: torch.Tensor, w13: torch.Tensor | Packed, w2: torch.Tensor | Packed, scale: torch.Tensor) -> torch.Tensor:
    """x [R, D] through one SwiGLU expert, row r times scale[r] -> [R, D], as ffn_row does for
    one row; up to SMALL_ROWS rows on panels in one call, the same bits as the torch ops."""
    if isinstance(w13, Packed) and isinstance(w2, Packed) and x.shape[0] <= SMALL_ROWS:
        return torch.ops.moe_serve_linear.panel_ffn(x, w13.panels, w2.panels, scale)
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2) * scale[:, None]


def ffn_add(out: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, w13: torch.Tensor | Packed,
            w2: torch.Tensor | Packed, scale: torch.Tensor, start: int, n: int) -> None:
    """out [T, D] += the rows rows[start:start + n] of y [T, D] through one expert, row i times
    scale[start + i], added into the same rows of out: in place, as out.index_add_ would, the
    same bits; on panels one call."""
    if isinstance(w13, Packed) and isinstance(w2, Packed) and n <= SMALL_ROWS:
        torch.ops.moe_serve_linear.panel_ffn_add(out, y, rows, w13.panels, w2.panels, scale, start, n)
        return
    r = rows[start:start + n]
    out.index_add_(0, r, ffn(y[r], w13, w2, scale[start:start + n]))
