"""The wire contract: committed stubs are current, and they work over real gRPC."""

import asyncio
import functools
from importlib.metadata import version

import grpc
import torch

from protos import codec, expert_pb2_grpc, generate, generation_pb2, generation_pb2_grpc
from protos import expert_pb2 as pb

PINNED_TOOLS = "1.85.1"  # pyproject.toml, dev extra


def test_stubs_are_current(tmp_path):
    generate.generate(tmp_path)
    stale = [name for name in generate.STUBS
             if (tmp_path / name).read_bytes() != (generate.PROTOS_DIR / name).read_bytes()]
    hint = ""
    if version("grpcio-tools") != PINNED_TOOLS:
        hint = f" (grpcio-tools here is {version('grpcio-tools')}, the pin is {PINNED_TOOLS})"
    assert not stale, f"stale generated stubs {stale}{hint}: run `make protos`"


def test_generated_stubs_have_every_rpc_of_the_contract():
    channel = grpc.insecure_channel("127.0.0.1:9")            # never connected: stubs are built lazily
    for module, stub_cls, service in ((pb, expert_pb2_grpc.ExpertShardStub, "ExpertShard"),
                                      (generation_pb2, generation_pb2_grpc.GenerationStub, "Generation")):
        stub = stub_cls(channel)
        methods = [m.name for m in module.DESCRIPTOR.services_by_name[service].methods]
        assert methods and all(callable(getattr(stub, m)) for m in methods), (service, methods)
    channel.close()
    req = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 2]))
    assert req.WhichOneof("prompt") == "token_ids"
    assert not req.HasField("temperature") and not req.HasField("seed")
    req.temperature = 0.0
    assert req.HasField("temperature")  # greedy is distinguishable from unset


class EchoShard(expert_pb2_grpc.ExpertShardServicer):
    """Returns hidden * the sum of each row's weights, via the message path."""

    async def Info(self, request, context):
        return pb.ShardInfo(shard_id="s0", dtype=pb.DTYPE_BFLOAT16, hidden_size=8,
                            layers=[pb.LayerExperts(layer=0, experts=[2, 5])])

    async def Forward(self, request, context):
        try:
            hidden = codec.decode(request.hidden)
            weights = codec.decode(request.weights)
        except codec.CodecError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        out = (hidden.float() * weights.sum(-1, keepdim=True)).to(hidden.dtype)
        result = pb.ExpertResult(batch_id=request.batch_id, rows=hidden.shape[0])
        codec.encode(out, result.output)
        return result


async def packed_forward(data: tuple, context):
    """The same Forward on the fast path: takes unpack's output, returns packed bytes."""
    batch, tensors = data
    out = (tensors["hidden"].float() * tensors["weights"].sum(-1, keepdim=True))
    result = pb.ExpertResult(batch_id=batch.batch_id, rows=out.shape[0])
    return codec.pack(result, output=out.to(tensors["hidden"].dtype))


async def serve(fast: bool) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    if fast:
        handler = grpc.unary_unary_rpc_method_handler(
            packed_forward, request_deserializer=functools.partial(codec.unpack, pb.ExpertBatch))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "moe_serve.expert.v1.ExpertShard", {"Forward": handler})])
    else:
        expert_pb2_grpc.add_ExpertShardServicer_to_server(EchoShard(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def batch(hidden, weights) -> pb.ExpertBatch:
    msg = pb.ExpertBatch(batch_id=41, layer=0)
    codec.encode(hidden, msg.hidden)
    codec.encode(weights, msg.weights)
    return msg


HIDDEN = torch.randn(3, 8).to(torch.bfloat16)
WEIGHTS = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.0]])
EXPECTED = (HIDDEN.float() * WEIGHTS.sum(-1, keepdim=True)).to(torch.bfloat16)


def test_loopback_with_generated_stubs():
    async def main():
        server, addr = await serve(fast=False)
        try:
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = expert_pb2_grpc.ExpertShardStub(channel)
                info = await stub.Info(pb.InfoRequest())
                result = await stub.Forward(batch(HIDDEN, WEIGHTS))
                bad = batch(HIDDEN, WEIGHTS)
                bad.hidden.data = bad.hidden.data[:-2]
                try:
                    await stub.Forward(bad)
                except grpc.aio.AioRpcError as e:
                    error = e
                return info, result, error
        finally:
            await server.stop(None)

    info, result, error = asyncio.run(main())
    assert [(p.layer, list(p.experts)) for p in info.layers] == [(0, [2, 5])]
    assert result.batch_id == 41 and result.rows == 3
    assert torch.equal(codec.decode(result.output), EXPECTED)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor data is 46 bytes, shape [3, 8] bfloat16 needs 48" in error.details()


def test_fast_path_interoperates_with_stubs():
    async def main():
        fast_server, fast_addr = await serve(fast=True)
        plain_server, plain_addr = await serve(fast=False)
        try:
            # A generated-stub client against a fast-path server ...
            async with grpc.aio.insecure_channel(fast_addr) as channel:
                from_fast = await expert_pb2_grpc.ExpertShardStub(channel).Forward(
                    batch(HIDDEN, WEIGHTS))
            # ... and a fast-path client against a generated-stub server.
            async with grpc.aio.insecure_channel(plain_addr) as channel:
                forward = channel.unary_unary(
                    "/moe_serve.expert.v1.ExpertShard/Forward",
                    response_deserializer=functools.partial(codec.unpack, pb.ExpertResult))
                request = codec.pack(pb.ExpertBatch(batch_id=41), hidden=HIDDEN, weights=WEIGHTS)
                from_plain = await forward(request)
            return from_fast, from_plain
        finally:
            await fast_server.stop(None)
            await plain_server.stop(None)

    from_fast, (result, tensors) = asyncio.run(main())
    assert from_fast.batch_id == 41 and torch.equal(codec.decode(from_fast.output), EXPECTED)
    assert result.batch_id == 41 and torch.equal(tensors["output"], EXPECTED)
