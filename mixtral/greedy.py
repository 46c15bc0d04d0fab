"""The greedy token of the lm_head, x @ W.T, without computing every fp32 logit.

Shapes: M rows, V vocabulary (the lm_head's outputs), D hidden (its inputs).

A greedy step wants only each row's argmax. On CPU in fp32, where the lm_head is half the
bytes a decode step streams (the `bench` preset's 65 MB of 126) or, for a batch, most of
its FLOPs, a copy of the weights screens the vocabulary: int8 with a scale per output for
a few rows (a quarter of the bytes), bf16 for more (half the bytes, twice the products per
instruction). A bound on the screen's error leaves only the few outputs that can hold the
maximum; those are computed in fp32 as `linear` computes them.
The token is the one torch.argmax gives over `linear`'s logits, bit for bit: exact, not an
approximation (csrc/greedy_head.cpp states the bound). Rows whose values are not finite
come back as -1 and take every logit.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch

from mixtral import native
from mixtral.linear import Packed

_SRC = (Path(__file__).resolve().parent / "csrc" / "greedy_head.cpp",)


class GreedyHead(NamedTuple):
    panels: torch.Tensor    # fp32 [V / 16, D, 16]: the lm_head's panels (mixtral/linear.py)
    screen: torch.Tensor    # bf16 [V / 16, D / 2, 16, 2]: screen[j, i, o, t] = bf16(W[16 j + o, 2 i + t])
    bound: torch.Tensor     # fp64 [3]: max_v |W_v|, max_v |bf16(W_v)|, max_v |W_v - bf16(W_v)|
    # A few rows read int8 instead, a quarter of the fp32 bytes: W_v ~ scale[v] * q[v] (panels
    # as `panels`), |q| <= 127; qbound as bound for scale[v] * q[v].
    q: torch.Tensor         # int8 [V / 16, D, 16]
    scale: torch.Tensor     # fp32 [V]
    qbound: torch.Tensor    # fp64 [3]


@functools.cache
def _built() -> bool:
    return (native.load("moe_serve_greedy", _SRC, "the greedy lm_head screen")
            and torch.ops.moe_serve_greedy.greedy_screen_built())


def pack_greedy(packed: torch.Tensor | Packed) -> GreedyHead | None:
    """The lm_head as pack_linear packed it -> its screen, or None where it does not apply:
    weights not on panels, D odd, no AVX-512 BF16 on this CPU, values not finite."""
    if not isinstance(packed, Packed) or packed.panels.shape[1] % 2 or not _built():
        return None
    P, D, _ = packed.panels.shape
    V = 16 * P
    screen = torch.empty(V, D, dtype=torch.bfloat16)
    q, scale = torch.empty(V, D, dtype=torch.int8), torch.empty(V)
    norms, qnorms = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    tiny = torch.finfo(torch.float32).tiny
    for s in range(0, V, 4096):          # in slices: fp64 copies of an 8x22B lm_head are GBs
        ws = packed.panels[s // 16:(s + 4096) // 16].permute(0, 2, 1).reshape(-1, D)   # W[s:s + 4096]
        if not torch.isfinite(ws).all():
            return None
        v = ws.to(torch.bfloat16)         # round to nearest even
        v = v.masked_fill(v.abs() < tiny, 0)   # denormals: the dot product reads them as zero
        if not torch.isfinite(v).all():
            return None
        screen[s:s + 4096] = v
        sc = ws.abs().amax(dim=1) / 127
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))                 # an all-zero row: q = 0
        qs = (ws / sc[:, None]).round().clamp(-127, 127).to(torch.int8)
        q[s:s + 4096], scale[s:s + 4096] = qs, sc
        wd = ws.double()
        norms = torch.maximum(norms, _maxima(wd, v.double()))
        qnorms = torch.maximum(qnorms, _maxima(wd, qs.double() * sc.double()[:, None]))
    screen = screen.view(V // 16, 16, D // 2, 2).permute(0, 2, 1, 3).contiguous()
    q = q.view(V // 16, 16, D).transpose(1, 2).contiguous()
    return GreedyHead(packed.panels, screen, norms, q, scale, qnorms)


def _maxima(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp64 [rows, D] twice -> [max |w_r|, max |v_r|, max |w_r - v_r|] over the rows."""
    return torch.stack([w.norm(dim=1).max(), v.norm(dim=1).max(), (w - v).norm(dim=1).max()])


def greedy_tokens(x: torch.Tensor, head: GreedyHead) -> torch.Tensor:
    """x [M, D] fp32 -> [M] int64: argmax(x @ W.T) per row, -1 for a row to take every logit."""
    return torch.ops.moe_serve_greedy.greedy_argmax(x, head.panels, head.screen, head.bound, head.q, head.scale,
                                                    head.qbound)
