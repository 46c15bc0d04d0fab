"""Expert shards: partial loading, grouped SwiGLU, dispatch and combine."""

import pytest
import torch
import torch.nn.functional as F

from expert_service.experts import ExpertWeights
from expert_service.loader import load_experts
from mixtral.checkpoint import Checkpoint, expert_tensor_names
from router.dispatch import Placement, combine, plan
from router.gating import route


def test_shard_owning_experts_0_and_3_reads_only_their_tensors(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    L = ckpt.config.num_hidden_layers
    pairs = [(l, e) for l in range(L) for e in (0, 3)]
    shard = load_experts(ckpt, pairs, torch.float32)
    wanted = {n for p in pairs for n in expert_tensor_names(*p)}
    assert set(ckpt.reads) == wanted
    assert all(c == 1 for c in ckpt.reads.values())
    assert sorted(shard.pairs) == sorted(pairs)


def _naive(y, ids, weights, tensors):
    """Token by token, expert by expert: the definition the grouped path must equal."""
    out = torch.zeros_like(y)
    for t in range(y.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            w1, w2, w3 = tensors[e]
            out[t] += weights[t, k] * (F.silu(y[t] @ w1.T) * (y[t] @ w3.T)) @ w2.T
    return out


def _random_experts(E, D, Fd, layers=(0,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(l, e): (torch.randn(Fd, D, generator=g), torch.randn(D, Fd, generator=g), torch.randn(Fd, D, generator=g))
            for l in layers for e in range(E)}


def test_grouped_swiglu_equals_per_token_definition():
    E, D, Fd, T, K = 5, 16, 24, 37, 2
    tensors = _random_experts(E, D, Fd)
    shard = ExpertWeights(tensors, E)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids[::4, 1] = -1                                      # slots whose expert lives in another group
    w = torch.rand(T, K, generator=g)
    ref = _naive(y, ids, w, {e: tensors[0, e] for e in range(E)})
    torch.testing.assert_close(shard.forward(0, y, ids, w), ref, rtol=1e-5, atol=1e-4)


def test_shard_refuses_experts_and_layers_it_does_not_hold():
    shard = ExpertWeights({k: v for k, v in _random_experts(4, 8, 8, layers=(0, 1)).items() if k[1] in (0, 3)}, 4)
    shard.check(1, torch.tensor([[0, 3], [3, -1]]))
    with pytest.raises(KeyError, match="expert 2 of layer 0"):
        shard.check(0, torch.tensor([[0, 2]]))
    with pytest.raises(KeyError, match="layer 5"):
        shard.check(5, torch.tensor([[0, 3]]))
    with pytest.raises(KeyError, match="out of range"):
        shard.check(0, torch.tensor([[7, 0]]))


@pytest.mark.parametrize("groups", [1, 2, 3, 8])
def test_dispatch_and_combine_equal_unsplit_moe(groups):
    E, D, Fd, T, K = 8, 16, 24, 50, 2
    tensors = _random_experts(E, D, Fd)
    placement = Placement.by_expert([list(range(g, E, groups)) for g in range(groups)], 1, E)
    shards = [ExpertWeights({p: tensors[p] for p in placement.pairs(g)}, E) for g in range(groups)]
    g = torch.Generator().manual_seed(2)
    y, gate = torch.randn(T, D, generator=g), torch.randn(E, D, generator=g)
    ids, w = route(y, gate, K)
    batches = plan(ids, w, placement.group_of[0])
    # each token goes once to each group holding at least one of its experts
    assert sum(len(b.rows) for b in batches) == sum(len(set(placement.group_of[0][ids[t]].tolist())) for t in range(T))
    for b in batches:
        assert ((b.expert_ids >= 0) == (b.weights > 0)).all()
    parts = [shards[b.group].forward(0, y[b.rows], b.expert_ids, b.weights) for b in batches]
    out = combine(parts, batches, torch.zeros(T, D))
    torch.testing.assert_close(out, _naive(y, ids, w, {e: tensors[0, e] for e in range(E)}), rtol=1e-5, atol=1e-4)


def test_gating_is_softmax_over_top_k_logits():
    g = torch.Generator().manual_seed(3)
    y, gate = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    ids, w = route(y, gate, 2)
    logits = y @ gate.T
    top, top_ids = logits.topk(2, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(w, torch.softmax(top, -1))
    # and it equals "softmax over all, keep top-k, renormalise"
    p = torch.softmax(logits, -1).gather(-1, ids)
    torch.testing.assert_close(w, p / p.sum(-1, keepdim=True))


def test_placement_rejects_gaps_and_overlaps():
    with pytest.raises(ValueError, match="no group serves"):
        Placement.by_expert([[0, 1]], 2, 3)
    with pytest.raises(ValueError, match="groups 0 and 1"):
        Placement.from_groups([[(0, 0), (0, 1)], [(0, 1)]], 1, 2)
    p = Placement.from_groups([[(0, 0), (1, 1)], [(0, 1), (1, 0)]], 2, 2)   # groups holding experts of some layers
    assert p.pairs(0) == [(0, 0), (1, 1)]
