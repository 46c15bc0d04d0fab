"""The decode step's fast paths against the code they stand in for: the fused CPU ops
(csrc/fused.cpp), the rope tables, one-row experts, single-group dispatch and combine."""

import pytest
import torch

from attention_service import cpu_kernels
from attention_service.attention import AttentionMetadata, attend, paged_attention
from attention_service.config import EngineConfig
from attention_service.model import apply_rope, rms_norm, rope
from attention_service.sampler import argmax
from cluster.local import build_engine
from expert_service.experts import ExpertWeights
from router.dispatch import Placement, combine, plan, split_experts

OPS = cpu_kernels.fused_ops(torch.float32, "cpu")
needs_ops = pytest.mark.skipif(OPS is None, reason="the CPU kernels could not be built here (no compiler?)")


@needs_ops
@pytest.mark.parametrize("T,D", [(1, 512), (3, 96), (40, 13)])
def test_rms_norm_matches_torch(T, D):
    g = torch.Generator().manual_seed(T)
    x, w = torch.randn(T, D, generator=g) * 3, torch.randn(D, generator=g)
    torch.testing.assert_close(OPS.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=2e-6, rtol=2e-6)


@needs_ops
@pytest.mark.parametrize("T,H,KVH,Dh", [(1, 8, 2, 64), (5, 4, 4, 16), (33, 6, 1, 8)])
def test_qkv_rope_cache_rotates_and_writes_like_torch(T, H, KVH, Dh):
    g = torch.Generator().manual_seed(H)
    qkv = torch.randn(T, (H + 2 * KVH) * Dh, generator=g)
    cos, sin = rope(torch.randint(0, 5000, (T,), generator=g), Dh, 1e6)
    S = 4 * T + 8
    slots = torch.randperm(S, generator=g)[:T]
    kc, vc = torch.randn(S, KVH, Dh, generator=g), torch.randn(S, KVH, Dh, generator=g)
    ref_k, ref_v = kc.clone(), vc.clone()
    qk = apply_rope(qkv[:, :(H + KVH) * Dh].view(T, H + KVH, Dh), cos, sin)
    ref_k[slots], ref_v[slots] = qk[:, H:], qkv[:, (H + KVH) * Dh:].view(T, KVH, Dh)
    q = OPS.qkv_rope_cache(qkv, cos, sin, kc, vc, slots, H)
    torch.testing.assert_close(q, qk[:, :H], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kc, ref_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(vc, ref_v)                 # v is copied, untouched slots too


@needs_ops
@pytest.mark.parametrize("B,V", [(32, 32000), (1, 32000), (3, 13), (2, 7), (2, 1)])
def test_argmax_rows_matches_torch(B, V):
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(V))
    assert torch.equal(OPS.argmax_rows(x), x.argmax(-1))
    assert torch.equal(argmax(x), x.argmax(-1))


@needs_ops
def test_argmax_rows_ties_infinities_and_nans_as_torch():
    """The first of equal maxima (0.0 and -0.0 too), an all -inf row, and a NaN beats +inf."""
    x = torch.randn(6, 1003, generator=torch.Generator().manual_seed(0))
    x[0, 900] = x[0, 5] = 50.0
    x[1] = float("-inf")
    x[2, 7] = x[2, 3] = float("nan")
    x[3, 999], x[3, 998] = float("inf"), float("nan")
    x[4] = 0.0
    x[4, :10] = -0.0
    x[5, 1000:] = 1e30              # the maximum in the tail past the last full vector
    got = OPS.argmax_rows(x)
    assert torch.equal(got, x.argmax(-1)) and got.tolist() == [5, 0, 3, 998, 0, 1000]


@needs_ops
def test_fused_ops_refuse_bad_input():
    qkv, cs = torch.randn(2, 12 * 8), torch.randn(2, 8)
    kc = torch.zeros(4, 2, 8)
    with pytest.raises(RuntimeError, match="out of the cache"):
        OPS.qkv_rope_cache(qkv, cs, cs, kc, kc.clone(), torch.tensor([0, 4]), 8)
    with pytest.raises(RuntimeError, match="qkv must be"):
        OPS.qkv_rope_cache(qkv[:, :-8], cs, cs, kc, kc.clone(), torch.tensor([0, 1]), 8)
    with pytest.raises(RuntimeError, match="fp32"):
        OPS.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-5)


def test_attend_on_a_decode_only_step_is_the_kernel_on_every_row():
    """Decodes only: the kernel's output is the step's, no rows gathered or scattered."""
    kernel = cpu_kernels.paged_decode_attention(torch.float32, "cpu")
    if kernel is None:
        pytest.skip("the CPU kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    lens, bs, H, KVH, Dh = [5, 40, 17], 8, 4, 2, 16
    tables = [[3 * i, 3 * i + 1, 3 * i + 2, 9 + i, 12 + i] for i in range(3)]
    kc, vc = torch.randn(16 * bs, KVH, Dh, generator=g), torch.randn(16 * bs, KVH, Dh, generator=g)
    q, k, v = torch.randn(3, H, Dh, generator=g), torch.randn(3, KVH, Dh, generator=g), torch.randn(3, KVH, Dh,
                                                                                                    generator=g)
    ref = paged_attention(q, k, v, kc.clone(), vc.clone(), AttentionMetadata.build([1] * 3, lens, tables, bs))
    meta = AttentionMetadata.build([1] * 3, lens, tables, bs, decode_kernel=kernel)
    assert meta.kernels_only
    out = paged_attention(q, k, v, kc, vc, meta)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(attend(q, kc, vc, meta), ref, atol=2e-6, rtol=1e-5)


def test_rope_tables_give_the_computed_values(tiny_ckpt):
    m = build_engine(tiny_ckpt, EngineConfig())[0].model
    for positions in (torch.tensor([0, 1, 2, 700]), torch.tensor([3000]), torch.arange(50)):
        upto = int(positions.max()) + 1
        for got, want in zip(m.rope(positions, upto), m.rope(positions)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _experts(E=4, D=16, F=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(0, e): (torch.randn(F, D, generator=g) / 4, torch.randn(D, F, generator=g) / 4,
                     torch.randn(F, D, generator=g) / 4) for e in range(E)}


@pytest.mark.parametrize("ids", [[[2, 0]], [[3, -1]], [[-1, -1]], [[1, 3, 0]]])
def test_one_row_experts_equal_the_general_path(ids):
    shard = ExpertWeights(_experts(), num_experts=4)
    y = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor(ids)
    w = torch.softmax(torch.randn(ids.shape, generator=torch.Generator().manual_seed(2)), -1) * (ids >= 0)
    # The general path, on two copies of the row: each row of its result is the row's alone.
    ref = shard.forward(0, y.expand(2, -1).contiguous(), ids.expand(2, -1), w.expand(2, -1))[:1]
    torch.testing.assert_close(shard.forward(0, y, ids, w), ref, atol=1e-6, rtol=1e-6)


def test_single_group_plan_and_combine_match_the_general_ones():
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=g)
    placement = Placement.by_expert(split_experts(8, 1), 2, 8)
    assert placement.only_group(1) == 0
    assert Placement.by_expert(split_experts(8, 2), 2, 8).only_group(1) is None
    fast, general = plan(ids, weights, placement.group_of[1], 0), plan(ids, weights, placement.group_of[1])
    assert len(fast) == len(general) == 1
    assert torch.equal(fast[0].rows, general[0].rows) and torch.equal(fast[0].expert_ids, general[0].expert_ids)
    h, part = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.equal(combine([part], fast, h.clone()), h.clone().index_add_(0, fast[0].rows, part))
