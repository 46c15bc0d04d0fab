"""Echo experts: a shard that answers each batch with its own rows, for measuring the wire.

`python -m expert_service --echo` serves these in place of the checkpoint's experts: the
same contract, validation and data path (receive, copy to the device, dequantize fp8
rows, copy back, send), no expert math and no expert weights loaded. `bench/wire.py`
measures our round trip against a raw socket's with one. Info reports `echo`, and
attention shards refuse to serve through such a shard.
"""

import torch


class EchoExperts:
    """Holds (layer, expert) pairs by name only; forward returns the rows it was given."""

    def __init__(self, pairs: list[tuple[int, int]], num_experts: int, dtype: torch.dtype):
        self.pairs = sorted(set(pairs))
        self.num_experts = num_experts
        self.dtype = dtype
        self._held = {layer: {e for l, e in self.pairs if l == layer} for layer, _ in self.pairs}

    def check(self, layer: int, ids: torch.Tensor) -> None:
        """The same refusals as real experts: a layer, or an expert of it, this shard does not hold."""
        if layer not in self._held:
            raise KeyError(f"layer {layer} is not held by this shard (holds layers {sorted(self._held)})")
        bad = (ids < -1) | (ids >= self.num_experts)
        if bad.any():
            raise KeyError(f"expert id {int(ids[bad][0])} out of range [0, {self.num_experts})")
        for e in torch.unique(ids[ids >= 0]).tolist():
            if e not in self._held[layer]:
                raise KeyError(f"expert {e} of layer {layer} is not held by this shard")

    def forward(self, layer: int, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return y
