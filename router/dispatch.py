"""Dispatch and combine: which rows go to which expert group, and how results come back.

Shapes: T tokens, D hidden, K top-k, E experts, G groups, R rows sent to one group.

A token is sent once per expert group that holds at least one of its K experts, with
the ids and weights of its experts in that group (-1 / 0 in the other slots). The group
answers with one weighted partial sum per row, so combining is a scatter-add of G
partial results: nothing about experts needs to be known on the way back.
"""

from dataclasses import dataclass

import torch


def split_experts(num_experts: int, groups: int) -> list[list[int]]:
    """Whole experts dealt round-robin into `groups` groups: 8 into 2 gives {0,2,4,6}, {1,3,5,7}."""
    if not 1 <= groups <= num_experts:
        raise ValueError(f"groups must be in [1, {num_experts}], got {groups}")
    return [list(range(g, num_experts, groups)) for g in range(groups)]


def group_pairs(experts: list[int], layers: list[int] | None, num_layers: int) -> list[tuple[int, int]]:
    """The (layer, expert) pairs a group of `experts` holds in `layers` (None: every layer)."""
    return [(layer, e) for layer in (range(num_layers) if layers is None else layers) for e in experts]


@dataclass(frozen=True)
class Placement:
    """group_of [L, E]: the expert group that serves (layer, expert); every pair has one."""

    group_of: torch.Tensor

    @classmethod
    def from_groups(cls, groups: list[list[tuple[int, int]]], num_layers: int, num_experts: int) -> "Placement":
        group_of = torch.full((num_layers, num_experts), -1, dtype=torch.int64)
        for g, pairs in enumerate(groups):
            for layer, expert in pairs:
                if group_of[layer, expert] >= 0:
                    raise ValueError(f"(layer {layer}, expert {expert}) is in groups "
                                     f"{int(group_of[layer, expert])} and {g}")
                group_of[layer, expert] = g
        missing = (group_of < 0).nonzero().tolist()
        if missing:
            raise ValueError(f"no group serves (layer, expert) pairs {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return cls(group_of)

    @classmethod
    def by_expert(cls, expert_groups: list[list[int]], num_layers: int, num_experts: int) -> "Placement":
        """Each group holds whole experts across all layers: the default layout."""
        return cls.from_groups([group_pairs(e, None, num_layers) for e in expert_groups], num_layers, num_experts)

    def only_group(self, layer: int) -> int | None:
        """The one group serving every expert of layer, or None where the experts are split."""
        groups = self.group_of[layer].unique().tolist()
        return groups[0] if len(groups) == 1 else None

    @property
    def num_groups(self) -> int:
        return int(self.group_of.max()) + 1

    def pairs(self, group: int) -> list[tuple[int, int]]:
        return [tuple(p) for p in (self.group_of == group).nonzero().tolist()]


@dataclass(frozen=True)
class GroupBatch:
    """The rows of one layer's step that one expert group must compute."""

    group: int
    rows: torch.Tensor      # [R] int64, indices into the step's T tokens
    expert_ids: torch.Tensor  # [R, K] int32, -1 where the slot's expert is in another group
    weights: torch.Tensor   # [R, K] float32, 0 where expert_ids is -1


def plan(ids: torch.Tensor, weights: torch.Tensor, group_of_layer: torch.Tensor,
         only: int | None = None) -> list[GroupBatch]:
    """ids, weights [T, K]; group_of_layer [E] -> one GroupBatch per group touched.

    only: the group that serves all of the layer's experts, when one does (Placement.only_group):
    every row goes there, nothing to look up."""
    if only is None:
        groups = group_of_layer[ids]                            # [T, K]
        present = torch.unique(groups).tolist()
    if only is not None or len(present) == 1:   # one group serves every slot: nothing to mask
        rows = torch.arange(ids.shape[0], device=ids.device)
        group = only if only is not None else present[0]
        return [GroupBatch(group=group, rows=rows, expert_ids=ids.to(torch.int32), weights=weights)]
    batches = []
    for g in present:
        mine = groups == g                                      # [T, K]
        rows = mine.any(dim=1).nonzero().squeeze(1)             # [R]
        mine = mine[rows]
        batches.append(GroupBatch(
            group=g,
            rows=rows,
            expert_ids=torch.where(mine, ids[rows], -1).to(torch.int32),
            weights=torch.where(mine, weights[rows], 0.0),
        ))
    return batches


def combine(partials: list[torch.Tensor], batches: list[GroupBatch], out: torch.Tensor) -> torch.Tensor:
    """Scatter-add each group's partial sums [R, D] into out [T, D] (which holds the residual).

    The contract: partials arrive on out's device (the transport lands them there). A partial
    elsewhere is a transport bug, refused here with what was where, never copied silently."""
    for part, b in zip(partials, batches):
        if part.device != out.device:
            raise RuntimeError(f"expert group {b.group}'s partial sums are on {part.device}, the hidden state "
                               f"on {out.device}: the transport must return them on the receiving device")
        if covers_all(b, out):    # the same sums, without the scatter's machinery
            out.add_(part.to(out.dtype))
        else:
            out.index_add_(0, b.rows, part.to(out.dtype))
    return out


def covers_all(batch: GroupBatch, x: torch.Tensor) -> bool:
    """True when batch takes every row of x [T, ...], in order (rows are distinct and ascending)."""
    return batch.rows.shape[0] == x.shape[0]
