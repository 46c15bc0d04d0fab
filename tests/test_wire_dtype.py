"""Bytes on the wire: bf16 rows give exactly the in-process bf16 results, fp8 rows stay within
a stated tolerance of them, and fp8 halves the request."""

import asyncio

import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.grpc_transport import GrpcTransport, discover
from attention_service.loader import connect_engine
from attention_service.sampling_params import SamplingParams
from attention_service.transport import InProcessTransport
from cluster.local import build_engine
from expert_service.launcher import running_shards
from expert_service.loader import load_experts
from mixtral.checkpoint import Checkpoint
from protos.wire_fp8 import E4M3, dequantize_rows, quantize_rows
from router.dispatch import Placement, plan, split_experts

D = 64
PROMPTS = [[1] + list(range(700, 700 + n)) for n in (3, 17, 40)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# fp8 dispatch against bf16, relative Frobenius error of a layer's expert partial sums.
# E4M3 rounds each element to within 2^-4 of itself; errors of independent elements
# partly cancel in the FFN's sums, so the outputs land well inside that bound.
FP8_REL_TOL = 2 ** -4


@pytest.fixture(scope="module")
def bf16_shards(tiny_ckpt):
    with running_shards(tiny_ckpt, split_experts(8, 2), dtype="bfloat16") as procs:
        yield [p.address for p in procs]


def test_quantize_rows_error_bound():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 512, generator=g) * torch.logspace(-3, 3, 300)[:, None]   # rows of every scale
    y[7] = 0                                                                        # and an all-zero row
    before = y.clone()
    q, scale = quantize_rows(y)
    assert torch.equal(y, before)                                                   # the rows are not touched
    q, scale = quantize_rows(y.to(torch.bfloat16))
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (300,)
    back = dequantize_rows(q, scale, torch.float32)
    ref = y.to(torch.bfloat16).float()
    # Half an ulp of 3 mantissa bits, relative; subnormals below 2^-6 * scale are spaced 2^-9 * scale.
    bound = torch.maximum(ref.abs() * 2 ** -4, scale[:, None] * 2 ** -10)
    assert ((back - ref).abs() <= bound).all()
    assert torch.equal(back[7], torch.zeros(512))
    torch.testing.assert_close(back.abs().amax(1), ref.abs().amax(1), rtol=1e-6, atol=0)  # each row spans fp8


async def _partials(addresses, layer, y, ids, w, wire_dtype):
    groups, placement = await discover(addresses, 2, 8, wire_dtype=wire_dtype)
    transport = GrpcTransport(groups, wire_dtype=wire_dtype)
    try:
        batches = plan(ids, w, placement.group_of[layer])
        return batches, await transport.forward(layer, y, batches), transport.stats
    finally:
        await transport.close()


def test_bf16_rows_equal_in_process_and_fp8_within_tolerance(tiny_ckpt, bf16_shards, one_thread):
    g = torch.Generator().manual_seed(3)
    T = 200
    y = torch.randn(T, D, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    w = torch.softmax(torch.randn(T, 2, generator=g), -1)
    ckpt = Checkpoint(tiny_ckpt, require_tokenizer=False)
    placement = Placement.by_expert(split_experts(8, 2), 2, 8)
    local = InProcessTransport([load_experts(ckpt, placement.pairs(g), torch.bfloat16) for g in range(2)])
    batches = plan(ids, w, placement.group_of[1])
    expect = asyncio.run(local.forward(1, y, batches))

    got_batches, bf16, bf16_stats = asyncio.run(_partials(bf16_shards, 1, y, ids, w, "model"))
    assert [b.group for b in got_batches] == [b.group for b in batches]
    for e, b in zip(expect, bf16):
        assert b.dtype == torch.bfloat16 and torch.equal(b, e)

    _, fp8, fp8_stats = asyncio.run(_partials(bf16_shards, 1, y, ids, w, "fp8"))
    for e, f in zip(expect, fp8):
        assert f.dtype == torch.bfloat16                          # results come back in the model's dtype
        rel = float((f.float() - e.float()).norm() / e.float().norm())
        assert 0 < rel <= FP8_REL_TOL, rel
    # Requests: D + 4 bytes a row instead of 2D, beside the same ids and weights.
    assert fp8_stats.bytes_sent < 0.75 * bf16_stats.bytes_sent
    assert fp8_stats.bytes_received == bf16_stats.bytes_received


def test_bf16_engine_over_grpc_gives_the_in_process_tokens(tiny_ckpt, bf16_shards, one_thread):
    cfg = EngineConfig(dtype="bfloat16")
    engine, _ = build_engine(tiny_ckpt, cfg, groups=2)
    expected = [s.output_ids for s in asyncio.run(engine.generate(PROMPTS, GREEDY))]

    async def run(wire_dtype):
        eng, _ = await connect_engine(tiny_ckpt, bf16_shards, EngineConfig(dtype="bfloat16", wire_dtype=wire_dtype))
        try:
            return [s.output_ids for s in await eng.generate(PROMPTS, GREEDY)]
        finally:
            await eng.runner.transport.close()

    assert asyncio.run(run("model")) == expected
    fp8 = asyncio.run(run("fp8"))
    assert [len(t) for t in fp8] == [len(t) for t in expected]
