"""Echo experts: a shard that answers each batch with its own rows, for measuring the wire.

`python -m expert_service --echo` serves these in place of the checkpoint's experts: the
same contract, validation and data path (receive, copy to the device, dequantize fp8
rows, copy back, send), no expert math and no expert weights loaded. `bench/wire.py`
measures our round trip against a raw socket's with one. Info reports `echo`, and
attention shards refuse to serve through such a shard.
"""

import torch

from expert_service.experts import ExpertWeights


class EchoExperts:
    """Holds (layer, expert) pairs by name only; forward returns the rows it was given."""

    # The same refusals as real experts, from the same lookup tables: a layer, or an expert
    # of it, that this shard does not hold.
    check = ExpertWeights.check

    def __init__(self, pairs: list[tuple[int, int]], num_experts: int, dtype: torch.dtype):
        self.num_experts = num_experts
        self.dtype = dtype
        self.pairs = sorted(set(pairs))
        self.local: dict[int, torch.Tensor] = {}       # layer -> [E + 1] local index of a global id, -1 if not held
        for layer in sorted({l for l, _ in self.pairs}):
            experts = [e for l, e in self.pairs if l == layer]
            lut = torch.full((num_experts + 1,), -1, dtype=torch.int64)
            lut[torch.tensor(experts)] = torch.arange(len(experts))
            self.local[layer] = lut

    def forward(self, layer: int, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return y
