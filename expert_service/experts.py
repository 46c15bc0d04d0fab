"""Expert FFNs for the (layer, expert) pairs one shard owns: grouped SwiGLU.

Shapes: T rows, D hidden, F expert ffn, K top-k slots per row, n experts held in a layer,
M rows laid out expert by expert (T*K, each expert's share padded to ALIGN, plus a spare).

    out[t] = sum_k w[t, k] * W2_e( silu(W1_e y[t]) * W3_e y[t] ),  e = ids[t, k]

W1 and W3 are stacked into one [2F, D] weight so each expert does two matmuls. Two ways
to run a batch, same numbers:
- grouped (GPU, fp8, and anything that must not sync): each layer's experts are stacked
  into [n, 2F, D] and [n, D, F]; the rows are sorted by expert and laid out in ALIGN-row
  groups with their offsets computed on the device, and each of the two matmuls is one
  grouped call for all experts (grouped_mm.py). Nothing is read back to the host, so a
  layer never waits on the GPU, and the whole forward can be captured in a CUDA graph
  (one per (layer, row bucket), mixtral/cuda_graphs.py). From a few rows per expert
  (weight-bound: every weight byte is read once) to thousands (compute-bound), it is the
  same call.
- per expert (CPU in fp32 and bf16/fp16): one matmul pair per expert present over its
  rows, through `linear` on weights prepared by `pack_linear` (oneDNN on CPU; see
  mixtral/linear.py). On a CPU the host "sync" is free, and this is the fastest path there.

fp8 weights (e4m3 with one scale per output channel, quantised at load) always take the
grouped way: on Hopper the fp8 kernel, elsewhere dequantised on the fly (grouped_mm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expert_service.grouped_mm import ALIGN, GroupedMM, quantize_fp8
from mixtral.cuda_graphs import GraphCache, bucket_for, pad_rows
from mixtral.linear import Packed, ffn_add, ffn_row, pack_linear


class ExpertWeights:
    """Weights of the (layer, expert) pairs one shard holds, and their grouped forward."""

    def __init__(self, tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 num_experts: int, fp8: bool = False, grouped: bool | None = None, cuda_graphs: bool = True,
                 matmul: str = "auto"):
        """tensors: (layer, expert) -> (w1 [F, D], w2 [D, F], w3 [F, D]) in the checkpoint's layout,
        in the dtype rows arrive and results leave in. fp8: keep the weights in e4m3.
        grouped: None picks it on anything but CPU (and always for fp8). cuda_graphs: capture
        decode-sized batches on CUDA. matmul: "auto", or "loop" to force GroupedMM's reference."""
        self.num_experts = num_experts
        first = next(iter(tensors.values()))[0]
        self._dtype, self.device, self.fp8 = first.dtype, first.device, fp8
        self.grouped = fp8 or (first.device.type != "cpu" if grouped is None else grouped)
        self.local: dict[int, torch.Tensor] = {}      # layer -> [E + 1] local index of a global id, -1 if not held
        self.w13: dict[int, object] = {}  # layer -> [n, 2F, D] (grouped) or n x packed [2F, D]
        self.w2: dict[int, object] = {}   # layer -> [n, D, F] (grouped) or n x packed [D, F]
        self.s13: dict[int, torch.Tensor] = {}        # fp8: layer -> scales [n, 2F]
        self.s2: dict[int, torch.Tensor] = {}         # fp8: layer -> scales [n, D]
        self.weight_bytes = 0                         # weights held, scales included
        self._local_ids: dict[int, list[int]] = {}    # layer -> self.local[layer] as a list
        for layer in sorted({l for l, _ in tensors}):
            experts = sorted(e for l, e in tensors if l == layer)
            w13 = [torch.cat([tensors[layer, e][0], tensors[layer, e][2]]) for e in experts]
            w2 = [tensors[layer, e][1] for e in experts]
            if not self.grouped:
                self.w13[layer], self.w2[layer] = [pack_linear(w) for w in w13], [pack_linear(w) for w in w2]
            elif fp8:   # one expert at a time: the fp32 copy quantising makes stays one expert's size
                q13, s13 = zip(*(quantize_fp8(w) for w in w13))
                q2, s2 = zip(*(quantize_fp8(w) for w in w2))
                self.w13[layer], self.s13[layer] = torch.stack(q13), torch.stack(s13)
                self.w2[layer], self.s2[layer] = torch.stack(q2), torch.stack(s2)
            else:
                self.w13[layer], self.w2[layer] = torch.stack(w13), torch.stack(w2)
            held = [d[layer] for d in (self.w13, self.w2, self.s13, self.s2) if layer in d] if self.grouped \
                else w13 + w2
            copies = 2 if not self.grouped and isinstance(self.w13[layer][0], Packed) else 1   # see pack_linear
            self.weight_bytes += copies * sum(t.numel() * t.element_size() for t in held)
            lut = torch.full((num_experts + 1,), -1, dtype=torch.int64)  # last slot: id -1 (empty slot)
            lut[torch.tensor(experts)] = torch.arange(len(experts))
            self.local[layer] = lut.to(self.device)
            self._local_ids[layer] = lut.tolist()
        self.mm = GroupedMM.probe(self._dtype, self.device, fp8, matmul) if self.grouped else None
        self.graphs = GraphCache(self.device, cuda_graphs and self.grouped)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(l, e) for l, lut in self.local.items() for e in range(self.num_experts) if lut[e] >= 0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows arrive and results leave in (the weights are e4m3 under fp8)."""
        return self._dtype


    def check(self, layer: int, ids: torch.Tensor) -> None:
        """Refuse a batch naming an expert this shard does not hold, before any compute."""
        if layer not in self.local:
            raise KeyError(f"layer {layer} is not held by this shard (holds layers {sorted(self.local)})")
        bad = (ids < -1) | (ids >= self.num_experts)
        if bad.any():
            raise KeyError(f"expert id {int(ids[bad][0])} out of range [0, {self.num_experts})")
        valid = ids >= 0
        held = self.local[layer].to(ids.device)[ids.clamp(min=-1)] >= 0
        if (valid & ~held).any():
            raise KeyError(f"expert {int(ids[valid & ~held][0])} of layer {layer} is not held by this shard")

    def forward(self, layer: int, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [T, D], ids [T, K] global expert ids (-1: none), weights [T, K] -> out [T, D], on y's device."""
        if not self.grouped:
            return self._forward_per_expert(layer, y, ids, weights)
        T = y.shape[0]
        bucket = bucket_for(T) if self.graphs.capture else None
        if bucket is None:
            return self._forward_grouped(layer, y, ids, weights)
        # Padding rows name no expert (-1) and weigh 0: they add nothing to any row.
        (out,) = self.graphs.run((layer, bucket), lambda *a: (self._forward_grouped(layer, *a),),
                                 (pad_rows(y, bucket), pad_rows(ids, bucket, -1), pad_rows(weights, bucket)))
        return out[:T]

    def _forward_grouped(self, layer: int, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        n = self.w13[layer].shape[0]
        local = self.local[layer][ids.long()].flatten()            # [T*K], -1 for empty slots
        order = torch.argsort(local, stable=True)                   # empty slots first, then expert by expert
        e_sorted = local[order]
        counts = torch.zeros(n + 1, dtype=torch.int64, device=y.device).index_add_(
            0, local + 1, torch.ones_like(local))                    # [n + 1], slot 0: empty slots
        first = torch.cumsum(counts, 0) - counts                    # first sorted position of each group
        padded = (counts[1:] + ALIGN - 1) // ALIGN * ALIGN         # [n] each expert's rows, padded
        ends = torch.cumsum(padded, 0)
        valid = e_sorted >= 0
        e = e_sorted.clamp(min=0)
        # Where each sorted slot's row goes: its expert's range, in order; empty slots to the spare last row.
        M = T * K + n * (ALIGN - 1) + 1
        rank = torch.arange(T * K, device=y.device) - first[e_sorted + 1]
        dest = torch.where(valid, ends[e] - padded[e] + rank, M - 1)
        token = torch.div(order, K, rounding_mode="floor")          # [T*K] the row of y of each sorted slot
        x = y.new_zeros(M, y.shape[1])
        x[dest] = y[token]
        offs = ends.to(torch.int32)
        gate, up = self.mm(x, self.w13[layer], self.s13.get(layer), offs).chunk(2, dim=-1)   # [M, F] each
        h = self.mm(F.silu(gate) * up, self.w2[layer], self.s2.get(layer), offs)            # [M, D]
        w = weights.flatten()[order].to(y.dtype)
        # torch.where, not a product: rows past the experts' ranges hold whatever the kernel left.
        part = torch.where(valid[:, None], h[dest] * w[:, None], 0)
        return torch.zeros_like(y).index_add_(0, token, part)

    def _forward_per_expert(self, layer: int, y: torch.Tensor, ids: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        if T == 1:
            return self._forward_one(layer, y, ids, weights)
        local = self.local[layer][ids.long()].flatten()            # [T*K], -1 for empty slots
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local + 1, minlength=len(self.w13[layer]) + 1).tolist()
        rows = torch.div(order, K, rounding_mode="floor")          # [T*K] token of each sorted slot
        w = weights.flatten()[order].to(y.dtype)
        out = torch.zeros_like(y)
        start = counts[0]                                           # skip empty slots (local == -1)
        for e, n in enumerate(counts[1:]):
            if n == 0:
                continue
            ffn_add(out, y, rows, self.w13[layer][e], self.w2[layer][e], w, start, n)   # out[r] += [n, D]
            start += n
        return out

    def _forward_one(self, layer: int, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One row (a single stream's decode step): its K experts' matmuls straight on it, summed
        in the order of the general path (expert by expert), without sorting or gathering rows."""
        lut = self._local_ids[layer]
        slots = sorted((lut[e], w) for e, w in zip(ids.tolist()[0], weights.tolist()[0])
                       if e >= 0 and lut[e] >= 0)
        out = None
        for e, w in slots:
            h = ffn_row(y, self.w13[layer][e], self.w2[layer][e], w)          # [1, D]
            out = h if out is None else out.add_(h)
        return torch.zeros_like(y) if out is None else out
