"""Expert FFNs for the (layer, expert) pairs one shard owns: grouped SwiGLU.

Shapes: T rows, D hidden, F expert ffn, K top-k slots per row, n experts held in a layer.

    out[t] = sum_k w[t, k] * W2_e( silu(W1_e y[t]) * W3_e y[t] ),  e = ids[t, k]

W1 and W3 are stacked into one [2F, D] weight so each expert does two matmuls. Rows
are sorted by expert once per call and each expert runs one matmul over all its rows:
the only Python loop is over the experts present, never over tokens.

Every matmul goes through `linear`, on weights prepared once by `pack_linear`
(mixtral/linear.py says why fp32 weights on CPU are handed to oneDNN).
"""

import torch
import torch.nn.functional as F

from mixtral.linear import linear, pack_linear


class ExpertWeights:
    """Weights of the (layer, expert) pairs one shard holds, and their grouped forward."""

    def __init__(self, tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 num_experts: int):
        """tensors: (layer, expert) -> (w1 [F, D], w2 [D, F], w3 [F, D]) in the checkpoint's layout."""
        self.num_experts = num_experts
        self.w13: dict[int, list[torch.Tensor]] = {}  # layer -> n x packed [2F, D]
        self.w2: dict[int, list[torch.Tensor]] = {}   # layer -> n x packed [D, F]
        self.local: dict[int, torch.Tensor] = {}      # layer -> [E + 1] local index of a global id, -1 if not held
        self._dtype = next(iter(tensors.values()))[0].dtype
        for layer in sorted({l for l, _ in tensors}):
            experts = sorted(e for l, e in tensors if l == layer)
            self.w13[layer] = [pack_linear(torch.cat([tensors[layer, e][0], tensors[layer, e][2]])) for e in experts]
            self.w2[layer] = [pack_linear(tensors[layer, e][1]) for e in experts]
            lut = torch.full((num_experts + 1,), -1, dtype=torch.int64)  # last slot: id -1 (empty slot)
            lut[torch.tensor(experts)] = torch.arange(len(experts))
            self.local[layer] = lut.to(tensors[layer, experts[0]][0].device)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(l, e) for l, lut in self.local.items() for e in range(self.num_experts) if lut[e] >= 0]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def check(self, layer: int, ids: torch.Tensor) -> None:
        """Refuse a batch naming an expert this shard does not hold, before any compute."""
        if layer not in self.local:
            raise KeyError(f"layer {layer} is not held by this shard (holds layers {sorted(self.local)})")
        bad = (ids < -1) | (ids >= self.num_experts)
        if bad.any():
            raise KeyError(f"expert id {int(ids[bad][0])} out of range [0, {self.num_experts})")
        valid = ids >= 0
        held = self.local[layer][ids.clamp(min=-1)] >= 0
        if (valid & ~held).any():
            raise KeyError(f"expert {int(ids[valid & ~held][0])} of layer {layer} is not held by this shard")

    def forward(self, layer: int, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [T, D], ids [T, K] global expert ids (-1: none), weights [T, K] -> out [T, D]."""
        T, K = ids.shape
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
            r = rows[start:start + n]
            gate, up = linear(y[r], self.w13[layer][e]).chunk(2, dim=-1)     # [n, F] each
            h = linear(F.silu(gate) * up, self.w2[layer][e])               # [n, D]
            out.index_add_(0, r, h * w[start:start + n, None])
            start += n
        return out
