"""Grouped experts (one grouped GEMM pair for all experts, offsets on the device) and fp8
weights, against the per-expert reference; the fp8 config flowing from app config to plan."""

import pytest
import torch
import torch.nn.functional as F

from cluster.serve.app_config import AppConfig
from cluster.tools.plan import expert_layer_bytes, make_plan
from expert_service.experts import ExpertWeights
from expert_service.grouped_mm import ALIGN, GroupedMM, dequantize, quantize_fp8
from expert_service.loader import load_experts
from mixtral.checkpoint import Checkpoint, resolve_dtype
from mixtral.config import ConfigError, preset

# fp8 (e4m3, 3 mantissa bits, a scale per output channel) against bf16 on the same weights:
# the relative error of a whole expert layer's output (Frobenius norm), two chained matmuls.
FP8_TOLERANCE = 0.08


def _experts(E, D, Fd, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)    # noqa: E731
    return {(0, e): (r(Fd, D), r(D, Fd), r(Fd, D)) for e in range(E)}


def _batch(T, E, K, counts=None, seed=1, dtype=torch.float32):
    """T rows, K slots each; counts[e]: how many slots name expert e (None: random)."""
    g = torch.Generator().manual_seed(seed)
    if counts is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    else:
        slots = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)] +
                          [torch.full((T * K - sum(counts),), -1)])
        ids = slots[torch.randperm(T * K, generator=g)].view(T, K)
    return (torch.randn(T, 32, generator=g).to(dtype), ids.int(), torch.rand(T, K, generator=g))


@pytest.mark.parametrize("counts", [
    [0, 0, 0, 0, 0, 0],                   # a batch of empty slots only
    [1, 0, 0, 0, 0, 0],                   # one row, one expert
    [3, 0, 17, 0, 1, 0],                  # experts with no rows between ones with some
    [16, 16, 16, 16, 16, 16],             # exactly ALIGN each
    [15, 33, 2, 64, 0, 7],                # each side of the alignment
    [300, 1, 0, 250, 90, 0],              # hundreds
])
@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_grouped_equals_per_expert(counts, mode):
    E, K = 6, 2
    T = max(1, -(-sum(counts) // K) + 3)
    tensors = _experts(E, 32, 48)
    y, ids, w = _batch(T, E, K, counts)
    ref = ExpertWeights(tensors, E, grouped=False).forward(0, y, ids, w)
    grouped = ExpertWeights(tensors, E, grouped=True, matmul=mode)
    assert grouped.mm.mode == mode
    torch.testing.assert_close(grouped.forward(0, y, ids, w), ref, rtol=1e-5, atol=1e-5)


def test_bf16_grouped_equals_per_expert_in_bf16():
    tensors = _experts(8, 32, 64, torch.bfloat16)
    y, ids, w = _batch(200, 8, 2, dtype=torch.bfloat16)
    ref = ExpertWeights(tensors, 8, grouped=False).forward(0, y, ids, w).float()
    got = ExpertWeights(tensors, 8, grouped=True).forward(0, y, ids, w).float()
    assert (got - ref).norm() / ref.norm() < 1e-2


def test_fp8_weights_are_e4m3_with_channel_scales_and_round_trip():
    w = torch.randn(64, 32) * torch.logspace(-3, 2, 64)[:, None]      # channels of very different sizes
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    assert float(q.float().abs().amax(1).min()) == 448.0               # every channel uses e4m3's range
    back = dequantize(q, scale, torch.float32)
    assert ((back - w).abs() / w.abs().amax(1, keepdim=True)).max() < 2 ** -4   # 3 mantissa bits


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_fp8_close_to_bf16(rows):
    tensors = _experts(8, 32, 64, torch.bfloat16)
    y, ids, w = _batch(rows, 8, 2, dtype=torch.bfloat16)
    bf16 = ExpertWeights(tensors, 8).forward(0, y, ids, w).float()
    shard = ExpertWeights(tensors, 8, fp8=True)
    assert shard.fp8 and shard.grouped and shard.dtype == torch.bfloat16
    assert shard.w13[0].dtype == torch.float8_e4m3fn and shard.s13[0].shape == (8, 128)
    fp8 = shard.forward(0, y, ids, w).float()
    err = float((fp8 - bf16).norm() / bf16.norm())
    assert 0 < err < FP8_TOLERANCE


def test_fp8_weight_bytes_are_about_half_of_bf16():
    tensors = _experts(4, 64, 128, torch.bfloat16)
    bf16, fp8 = ExpertWeights(tensors, 4).weight_bytes, ExpertWeights(tensors, 4, fp8=True).weight_bytes
    assert bf16 == 4 * 3 * 64 * 128 * 2
    assert fp8 == 4 * 3 * 64 * 128 + 4 * (2 * 128 + 64) * 4      # a byte a weight, fp32 scale per channel


def test_probe_refuses_a_kernel_that_disagrees(monkeypatch):
    """A grouped kernel that gives wrong numbers on this machine is never used."""
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: real(*a, **k) * 1.5)
    assert GroupedMM.probe(torch.float32, "cpu", fp8=False).mode == "loop"
    monkeypatch.setattr(torch, "_grouped_mm", real)
    assert GroupedMM.probe(torch.float32, "cpu", fp8=False).mode == "grouped"


def test_alignment_padding_keeps_rows_apart():
    """Rows laid out in ALIGN-row groups: an expert with ALIGN + 1 rows spills into a second group."""
    tensors = _experts(2, 32, 48)
    y, ids, w = _batch(ALIGN + 1, 2, 1, counts=[ALIGN + 1, 0])
    ref = ExpertWeights(tensors, 2, grouped=False).forward(0, y, ids, w)
    torch.testing.assert_close(ExpertWeights(tensors, 2, grouped=True).forward(0, y, ids, w), ref)


def test_fp8_flows_from_config_to_loaded_shard(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    assert resolve_dtype("fp8", ckpt, "cpu") == torch.float8_e4m3fn
    shard = load_experts(ckpt, [(0, 1), (1, 1)], resolve_dtype("fp8", ckpt, "cpu"))
    # rows travel in what "auto" is on this device (the checkpoint's fp32 on CPU)
    assert shard.fp8 and shard.dtype == torch.float32 and shard.w2[1].dtype == torch.float8_e4m3fn
    ref = load_experts(ckpt, [(0, 1), (1, 1)], torch.float32)
    y = torch.randn(5, ckpt.config.hidden_size)
    ids, w = torch.full((5, 2), 1, dtype=torch.int32), torch.full((5, 2), 0.5)
    ids[:, 1] = -1
    out, want = shard.forward(1, y, ids, w), ref.forward(1, y, ids, w)
    assert float((out - want).norm() / want.norm()) < FP8_TOLERANCE
    assert AppConfig(expert_dtype="fp8").expert_dtype == "fp8"
    with pytest.raises(ConfigError, match="expert_dtype"):
        AppConfig(expert_dtype="int4")


def test_plan_counts_fp8_expert_bytes():
    mc = preset("mixtral-8x22b")
    assert expert_layer_bytes(mc, "fp8") == 3 * 6144 * 16384 + 4 * (2 * 16384 + 6144)
    bf16 = make_plan(mc, gpu_bytes=141 * 10**9, context=65536, concurrency=8)
    fp8 = make_plan(mc, gpu_bytes=141 * 10**9, context=65536, concurrency=8, expert_dtype="fp8")
    assert fp8.expert_bytes < 0.51 * bf16.expert_bytes
    assert len(fp8.groups) < len(bf16.groups)                 # twice the experts fit a GPU
    assert fp8.expert_dtype == "fp8" and fp8.dtype == "bfloat16"


def test_naive_definition_for_reference():
    """The per-expert path itself against the token-by-token definition (the anchor of the rest)."""
    tensors = _experts(3, 32, 16)
    y, ids, w = _batch(9, 3, 2)
    out = torch.zeros_like(y)
    for t in range(9):
        for k in range(2):
            w1, w2, w3 = tensors[0, int(ids[t, k])]
            out[t] += w[t, k] * (F.silu(y[t] @ w1.T) * (y[t] @ w3.T)) @ w2.T
    torch.testing.assert_close(ExpertWeights(tensors, 3, grouped=False).forward(0, y, ids, w), out,
                               rtol=1e-5, atol=1e-5)
