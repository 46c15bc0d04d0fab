"""Expert shards over real gRPC: launched as subprocesses, held to the in-process math."""

import asyncio
import functools
import signal
import threading

import grpc
import pytest
import torch

from expert_service.launcher import ShardStartError, running_shards, start_shards, stop_shards
from expert_service.loader import load_experts
from expert_service.server import FORWARD, FORWARD_STREAM, channel_options, serve
from mixtral.checkpoint import Checkpoint
from protos import codec, expert_pb2_grpc
from protos import expert_pb2 as pb

LIMIT = 1 << 20  # the main shard's message limit: small, so an oversize batch is cheap to build
D = 64           # the tiny preset's hidden size


@pytest.fixture(scope="module")
def shard(tiny_ckpt):
    with running_shards(tiny_ckpt, [[0, 3]], extra_args=["--max-message-bytes", str(LIMIT)]) as (s,):
        yield s


@pytest.fixture(scope="module")
def oracle(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt, require_tokenizer=False)
    return load_experts(ckpt, [(l, e) for l in range(ckpt.config.num_hidden_layers) for e in (0, 3)], torch.float32)


def _inputs(T, seed=0, experts=(0, 3, -1)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(T, D, generator=g)
    ids = torch.tensor(experts, dtype=torch.int32)[torch.randint(len(experts), (T, 2), generator=g)]
    return y, ids, torch.rand(T, 2, generator=g)


def _pack(y, ids, w, layer=0, batch_id=1) -> bytes:
    return codec.pack(pb.ExpertBatch(batch_id=batch_id, layer=layer), hidden=y, expert_ids=ids, weights=w)


_unpack_result = functools.partial(codec.unpack, pb.ExpertResult)


async def _forward(address: str, data: bytes):
    async with grpc.aio.insecure_channel(address, options=channel_options()) as ch:
        return await ch.unary_unary(FORWARD, response_deserializer=_unpack_result)(data, timeout=30)


def forward(address: str, data: bytes):
    return asyncio.run(_forward(address, data))


def stub_call(address: str, method: str, request):
    async def call():
        async with grpc.aio.insecure_channel(address) as ch:
            return await getattr(expert_pb2_grpc.ExpertShardStub(ch), method)(request, timeout=30)
    return asyncio.run(call())


def _assert_matches(oracle, layer, y, ids, w, result):
    msg, tensors = result
    expect = oracle.forward(layer, y, ids, w)
    torch.testing.assert_close(tensors["output"], expect, rtol=1e-6, atol=1e-6)
    assert msg.rows == int((ids >= 0).sum())
    assert msg.compute_seconds > 0


# --- Info and the math ----------------------------------------------------------------------
def test_info_reports_exactly_what_the_shard_holds(shard, tiny_ckpt):
    info = stub_call(shard.address, "Info", pb.InfoRequest())
    assert [(le.layer, list(le.experts)) for le in info.layers] == [(0, [0, 3]), (1, [0, 3])]
    assert info.dtype == pb.DTYPE_FLOAT32
    assert info.checkpoint_fingerprint == Checkpoint(tiny_ckpt).fingerprint()
    assert info.shard_id == "g0" and info.hidden_size == D
    health = stub_call(shard.address, "Health", pb.HealthRequest())
    assert health.status == pb.HealthResponse.SERVING and health.inflight_batches == 0


@pytest.mark.parametrize("layer", [0, 1])
def test_forward_equals_in_process_experts(shard, oracle, layer):
    y, ids, w = _inputs(33, seed=layer)
    result = forward(shard.address, _pack(y, ids, w, layer=layer, batch_id=7))
    assert result[0].batch_id == 7
    _assert_matches(oracle, layer, y, ids, w, result)


def test_forward_stream_with_batches_in_flight(shard, oracle):
    batches = {i: (i % 2, *_inputs(5 + 11 * i, seed=100 + i)) for i in range(8)}

    async def run():
        async with grpc.aio.insecure_channel(shard.address, options=channel_options()) as ch:
            call = ch.stream_stream(FORWARD_STREAM, response_deserializer=_unpack_result)(timeout=30)
            for i, (layer, y, ids, w) in batches.items():  # all sent before any answer is read
                await call.write(_pack(y, ids, w, layer=layer, batch_id=i))
            await call.done_writing()
            return {msg.batch_id: (msg, tensors) async for msg, tensors in call}

    results = asyncio.run(run())
    assert sorted(results) == sorted(batches)
    for i, (layer, y, ids, w) in batches.items():
        _assert_matches(oracle, layer, y, ids, w, results[i])


def test_empty_batch(shard):
    msg, tensors = forward(shard.address, _pack(torch.empty(0, D), torch.empty(0, 2, dtype=torch.int32),
                                                 torch.empty(0, 2)))
    assert tensors["output"].shape == (0, D) and msg.rows == 0


# --- bad input ------------------------------------------------------------------------------
def _truncated() -> bytes:
    y, ids, w = _inputs(4)
    msg = pb.ExpertBatch(batch_id=1, layer=0)
    codec.encode(y, msg.hidden), codec.encode(ids, msg.expert_ids), codec.encode(w, msg.weights)
    msg.hidden.data = msg.hidden.data[:-4]
    return msg.SerializeToString()


def _bad(**change) -> bytes:
    y, ids, w = _inputs(4)
    args = dict(y=y, ids=ids, w=w, layer=0)
    args.update(change)
    return _pack(args["y"], args["ids"], args["w"], layer=args["layer"])


BAD = {
    "wrong hidden size": (lambda: _bad(y=torch.randn(4, 32)), "hidden has shape [4, 32], expected [T, 64]"),
    "hidden not 2-D": (lambda: _bad(y=torch.randn(4, 2, D)), "hidden has shape [4, 2, 64]"),
    "expert not held": (lambda: _bad(ids=torch.tensor([[0, 1]] * 4, dtype=torch.int32)),
                        "expert 1 of layer 0 is not held"),
    "expert out of range": (lambda: _bad(ids=torch.tensor([[0, 8]] * 4, dtype=torch.int32)), "out of range"),
    "layer out of range": (lambda: _bad(layer=2), "layer 2 is not held"),
    "truncated tensor": (_truncated, "hidden: tensor data is 1020 bytes, shape [4, 64] float32 needs 1024"),
    "wrong dtype": (lambda: _bad(y=torch.randn(4, D, dtype=torch.bfloat16)),
                    "hidden is bfloat16, this shard computes in float32"),
    "ids rows mismatch": (lambda: _bad(ids=torch.zeros(3, 2, dtype=torch.int32)), "expert_ids has shape [3, 2]"),
    "weights shape mismatch": (lambda: _bad(w=torch.rand(4, 1)), "weights has shape [4, 1], expected [4, 2]"),
    "float ids": (lambda: _bad(ids=torch.zeros(4, 2)), "expert_ids is float32"),
    "missing tensors": (lambda: pb.ExpertBatch(batch_id=1).SerializeToString(), "missing hidden, expert_ids, weights"),
    "not a message": (lambda: b"\xff\xff\xff", "malformed message"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_batch_is_invalid_argument(shard, case):
    make, message = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        forward(shard.address, make())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_bad_batch_on_stream_is_answered_with_its_error_and_the_stream_goes_on(shard, oracle):
    y, ids, w = _inputs(6)

    async def run():
        async with grpc.aio.insecure_channel(shard.address, options=channel_options()) as ch:
            call = ch.stream_stream(FORWARD_STREAM, response_deserializer=_unpack_result)(timeout=30)
            await call.write(_pack(y, ids, w, batch_id=1))
            await call.write(_bad(layer=5))                      # batch id 1 too: _bad packs id 1
            await call.write(_pack(y, ids, w, layer=1, batch_id=3))
            await call.done_writing()
            return [r async for r in call], await call.code()

    got, code = asyncio.run(run())
    assert code == grpc.StatusCode.OK and len(got) == 3
    _assert_matches(oracle, 0, y, ids, w, got[0])
    bad, tensors = got[1]
    assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "layer 5 is not held" in bad.error
    assert "output" not in tensors
    _assert_matches(oracle, 1, y, ids, w, got[2])


def test_unparseable_message_fails_the_stream(shard):
    async def run():
        async with grpc.aio.insecure_channel(shard.address, options=channel_options()) as ch:
            call = ch.stream_stream(FORWARD_STREAM, response_deserializer=_unpack_result)(timeout=30)
            await call.write(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call:
                    pass
        return e.value

    error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in error.details()


def test_oversize_batch_is_resource_exhausted(shard):
    y, ids, w = _inputs(LIMIT // (D * 4) + 1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        forward(shard.address, _pack(y, ids, w))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_shard_still_serves_after_bad_input(shard, oracle):
    assert shard.process.poll() is None
    y, ids, w = _inputs(17, seed=5)
    _assert_matches(oracle, 1, y, ids, w, forward(shard.address, _pack(y, ids, w, layer=1)))


# --- lifecycle ------------------------------------------------------------------------------
def test_drain_finishes_inflight_batches_then_stops(tiny_ckpt, oracle):
    y, ids, w = _inputs(9, seed=3)

    async def run():
        server, port = await serve(tiny_ckpt, [0, 3])
        address = f"127.0.0.1:{port}"
        servicer, release = server.servicer, threading.Event()
        real = servicer.experts.forward
        servicer.experts.forward = lambda *a: release.wait(10) and real(*a)  # hold the batch in compute
        try:
            call = asyncio.ensure_future(_forward(address, _pack(y, ids, w)))
            while servicer.inflight == 0:
                await asyncio.sleep(0.01)
            drain = asyncio.ensure_future(server.drain(grace=10))
            await asyncio.sleep(0.05)
            health = await _health(address)
            release.set()
            result = await call
            await drain
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await _forward(address, _pack(y, ids, w))
            return health, result, after.value.code()
        finally:
            release.set()
            await server.stop(0)

    health, result, after = asyncio.run(run())
    assert health.status == pb.HealthResponse.DRAINING and health.inflight_batches == 1
    _assert_matches(oracle, 0, y, ids, w, result)
    assert after == grpc.StatusCode.UNAVAILABLE


async def _health(address):
    async with grpc.aio.insecure_channel(address) as ch:
        return await expert_pb2_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=10)


def test_launcher_groups_and_sigterm_exits_0(tiny_ckpt):
    shards = start_shards(tiny_ckpt, [[1, 2], [5]], layers=[1])
    try:
        infos = [stub_call(s.address, "Info", pb.InfoRequest()) for s in shards]
        assert [[(le.layer, list(le.experts)) for le in i.layers] for i in infos] == [[(1, [1, 2])], [(1, [5])]]
        assert len({s.address for s in shards}) == 2
        shards[0].process.send_signal(signal.SIGTERM)
        assert shards[0].process.wait(30) == 0
        assert stop_shards(shards) == [0, 0]
    finally:
        for s in shards:
            s.kill()


def test_launcher_quotes_the_error_of_a_shard_that_dies(tiny_ckpt):
    with pytest.raises(ShardStartError, match=r"(?s)exited with code 1.*expert 9\) is outside the model"):
        start_shards(tiny_ckpt, [[0, 9]])


# --- busy time: the autoscaling policy's "replica saturated" signal -------------------------
class _TimedExperts:
    """Experts whose forward waits (no CPU) or spins (CPU) for a while, then answers zeros."""

    dtype = torch.float32

    def __init__(self, seconds: float, spin: bool):
        self.seconds, self.spin = seconds, spin

    def forward(self, layer, y, ids, w):
        if self.spin:
            import time
            end = time.thread_time() + self.seconds
            while time.thread_time() < end:
                pass
        else:
            threading.Event().wait(self.seconds)
        return torch.zeros_like(y)


@pytest.mark.parametrize("spin", [False, True])
def test_busy_time_on_cpu_counts_the_cpu_a_batch_got_not_its_wait(spin):
    """A replica starved of cores (here: waiting) is not busy; one that computes is busy for the
    CPU it got (0.2 s of thread time), however long a loaded machine made it wait for a core."""
    from expert_service.server import ExpertShardServicer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        servicer = ExpertShardServicer(_TimedExperts(0.2, spin), D, "fp", "g0")
        y, ids, w = _inputs(4)
        _, seconds, _ = servicer._compute(0, y, None, ids, w)
    finally:
        torch.set_num_threads(threads)
    assert seconds >= 0.2                    # the wall time is still what the RPC reports
    if spin:
        assert 0.2 <= servicer.busy_seconds <= seconds
    else:
        assert servicer.busy_seconds < 0.05
