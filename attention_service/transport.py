"""How the attention side reaches the experts: one interface, in-process or over gRPC.

The per-layer loop calls `forward(layer, y, batches)` with one GroupBatch per expert group
the layer's tokens need and gets back one partial sum [R, D] per batch. The in-process
transport calls the expert math directly; it is the oracle the gRPC transport is held to
and the baseline the disaggregation benchmark measures against.
"""

from typing import Protocol

import torch

from router.dispatch import GroupBatch, covers_all


class ExpertTransport(Protocol):
    async def forward(self, layer: int, y: torch.Tensor, batches: list[GroupBatch]) -> list[torch.Tensor]:
        """y [T, D]; for each batch, the weighted partial sums [R, D] of its rows."""
        ...

    async def close(self) -> None: ...


class InProcessTransport:
    """Expert groups in this process; groups[g] has forward(layer, y, ids, weights) -> [R, D]."""

    def __init__(self, groups: list):
        self.groups = groups

    async def forward(self, layer: int, y: torch.Tensor, batches: list[GroupBatch]) -> list[torch.Tensor]:
        return [self.groups[b.group].forward(layer, y if covers_all(b, y) else y[b.rows], b.expert_ids, b.weights)
                for b in batches]

    async def close(self) -> None:
        pass
