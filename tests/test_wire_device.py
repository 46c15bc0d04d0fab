"""Tensors that cross the wire land on the receiving side's device, in the dtype it needs.

A CPU-only machine has one real device, so a second one is made of the meta device
(tests/fake_device.py): tensors there hold data, and mixing them with host tensors raises
as CUDA does. The shard is a real process over real gRPC.
"""

import asyncio
import subprocess
import sys

import pytest
import torch
from fake_device import FAKE, OnDevice, fake_device, host

from attention_service.grpc_transport import GrpcTransport
from attention_service.transport import InProcessTransport
from expert_service.launcher import running_shards
from expert_service.loader import load_experts
from expert_service.server import ExpertShardServicer
from mixtral.checkpoint import Checkpoint
from protos import codec
from protos import expert_pb2 as pb
from protos.wire_fp8 import quantize_rows
from router.dispatch import GroupBatch, Placement, combine, plan, split_experts

D = 64  # the tiny preset's hidden size


@pytest.fixture(scope="module")
def shards(tiny_ckpt):
    with running_shards(tiny_ckpt, split_experts(8, 2)) as procs:
        yield [[p.address] for p in procs]


def _step(seed: int, T: int = 23):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, 2, generator=g), -1)
    return y, ids, weights


def _expected(tiny_ckpt, layer, y, ids, weights):
    """h + sum of expert outputs, computed in-process on the host."""
    ckpt = Checkpoint(tiny_ckpt, require_tokenizer=False)
    placement = Placement.by_expert(split_experts(8, 2), 2, 8)
    groups = [load_experts(ckpt, placement.pairs(g), torch.float32) for g in range(2)]
    batches = plan(ids, weights, placement.group_of[layer])
    parts = asyncio.run(InProcessTransport(groups).forward(layer, y, batches))
    return combine(parts, batches, y.clone())


def test_grpc_results_land_on_the_device_of_the_hidden_state(tiny_ckpt, shards):
    """The attention side on another device than the host: its expert outputs come back there."""
    y, ids, weights = _step(0)
    expect = _expected(tiny_ckpt, 1, y, ids, weights)
    placement = Placement.by_expert(split_experts(8, 2), 2, 8)

    async def run():
        transport = GrpcTransport(shards)
        try:
            with fake_device() as dev:
                yd = y.to(dev)
                # Planned on the host (tolist() cannot see through the fake device), then moved.
                batches = [GroupBatch(b.group, b.rows.to(dev), b.expert_ids.to(dev), b.weights.to(dev))
                           for b in plan(ids, weights, placement.group_of[1])]
                parts = await transport.forward(1, yd, batches)
                assert [p.device for p in parts] == [yd.device] * len(parts)
                assert all(isinstance(p, OnDevice) for p in parts)
                return combine(parts, batches, yd.clone())   # raises if a part is on the host
        finally:
            await transport.close()

    x = asyncio.run(run())
    assert x.device == FAKE
    torch.testing.assert_close(host(x), expect, rtol=1e-6, atol=1e-6)


class _DeviceChecking:
    """Experts on FAKE: refuse inputs anywhere else; out = y * (sum of the row's weights)."""

    dtype = torch.float32

    def check(self, layer, ids):
        pass

    def forward(self, layer, y, ids, w):
        for t in (y, ids, w):
            assert isinstance(t, OnDevice), f"expert input on {t.device}, not on the shard's device"
        return y * w.sum(-1, keepdim=True)


@pytest.mark.parametrize("fp8", [False, True])
def test_shard_moves_rows_to_its_device_and_results_back(fp8):
    y, ids, w = _step(1, T=9)
    tensors = dict(zip(("hidden", "hidden_scale"), quantize_rows(y))) if fp8 else {"hidden": y}
    data = codec.pack(pb.ExpertBatch(batch_id=4, layer=0), **tensors, expert_ids=ids.to(torch.int32), weights=w)
    servicer = ExpertShardServicer(_DeviceChecking(), D, "fp", "g0", device=str(FAKE))

    async def run():
        with fake_device():
            return await servicer._answer(codec.unpack(pb.ExpertBatch, data))

    try:
        msg, out = codec.unpack(pb.ExpertResult, asyncio.run(run()))
    finally:
        servicer.close()
    assert msg.batch_id == 4 and out["output"].device.type == "cpu"
    expect = y * w.sum(-1, keepdim=True)
    tol = dict(rtol=2 ** -4, atol=1e-6) if fp8 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["output"], expect, **tol)


def test_in_process_transport_keeps_its_contract(tiny_ckpt):
    """The oracle: partial sums on y's device, in y's dtype, one per batch."""
    y, ids, weights = _step(2)
    ckpt = Checkpoint(tiny_ckpt, require_tokenizer=False)
    placement = Placement.by_expert(split_experts(8, 2), 2, 8)
    groups = [load_experts(ckpt, placement.pairs(g), torch.float32) for g in range(2)]
    batches = plan(ids, weights, placement.group_of[0])
    parts = asyncio.run(InProcessTransport(groups).forward(0, y, batches))
    assert [(p.device, p.dtype, p.shape) for p in parts] == [(y.device, y.dtype, (len(b.rows), D)) for b in batches]


def test_services_import_and_start_without_ray():
    """The GPU machine has no Ray: nothing the services import may pull it in."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import attention_service.grpc_transport, attention_service.loader, expert_service.server\n"
            "from expert_service.__main__ import parser\n"
            "assert parser().parse_args(['--model', 'x', '--experts', '0', '--echo']).echo\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
