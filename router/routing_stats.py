"""Where tokens were routed: the load signal that expert autoscaling and the heat map read.

Shapes: T tokens, K top-k, L layers, E experts, G groups.

Counts are cumulative (token, expert) pairs per layer and expert, kept on the device the
router runs on and added to with one index_add per layer, so a step pays no host sync;
they are read (and moved to the host) only when someone asks.
"""

import time

import torch


class RoutingStats:
    def __init__(self, group_of: torch.Tensor):
        """group_of [L, E]: the group serving each (layer, expert) pair."""
        self.group_of = group_of.cpu()
        self.num_groups = int(self.group_of.max()) + 1
        L, E = self.group_of.shape
        self.counts: torch.Tensor | None = None          # [L, E] int64, on the router's device
        self._last: tuple[float, torch.Tensor] = (time.monotonic(), torch.zeros(L, E, dtype=torch.int64))

    def add(self, layer: int, ids: torch.Tensor) -> None:
        """ids [T, K] of one layer's routing."""
        if self.counts is None:
            self.counts = torch.zeros(self.group_of.shape, dtype=torch.int64, device=ids.device)
            self._one = torch.ones(1, dtype=torch.int64, device=ids.device)
        # routed_counts added in place: no [E] tensor built, one op per layer of a step.
        flat = ids.flatten()
        self.counts[layer].index_add_(0, flat, self._one.expand(flat.shape[0]))

    def snapshot(self) -> torch.Tensor:
        """[L, E] cumulative pairs, on the host."""
        if self.counts is None:
            return torch.zeros(self.group_of.shape, dtype=torch.int64)
        return self.counts.to("cpu", copy=True)     # a copy even on CPU: the counts keep moving

    def per_group(self, counts: torch.Tensor) -> list[int]:
        """[L, E] counts -> pairs per group [G]."""
        return torch.zeros(self.num_groups, dtype=torch.int64).index_add_(
            0, self.group_of.flatten(), counts.flatten()).tolist()

    def rates(self) -> list[float]:
        """Pairs per second per group since the previous call."""
        now, counts = time.monotonic(), self.snapshot()
        t0, c0 = self._last
        self._last = (now, counts)
        dt = max(now - t0, 1e-6)
        return [n / dt for n in self.per_group(counts - c0)]
