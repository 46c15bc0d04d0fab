"""The standard gRPC services, spoken as generic tools speak them: `grpc.health.v1` Check and Watch
(SERVING, then NOT_SERVING when a shard drains or the front door's app cannot serve), and server
reflection, from which a client with no .proto builds the messages and calls the services.
Real servers: an expert shard process, and the front door's grpc.aio server over an engine whose
experts are in another process."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.grpc_transport import GrpcTransport
from attention_service.loader import open_engine
from cluster.api.backend import LocalBackend
from cluster.api.grpc_api import start_grpc_server
from expert_service.launcher import running_shards
from expert_service.server import serve
from mixtral.checkpoint import Checkpoint
from protos import generation_pb2 as gpb
from protos import generation_pb2_grpc as ggrpc
from protos.channel import INFO
from protos.shard_access import ShardAccess
from router.dispatch import Placement

EXPERT = "moe_serve.expert.v1.ExpertShard"
GENERATION = "moe_serve.generation.v1.Generation"
HEALTH, REFLECTION = "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def reflected(channel, service: str, method: str):
    """A callable for service/method and its request class, from the server's reflection alone
    (a fresh descriptor pool: nothing of this process's generated code is used)."""
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    m = pool.FindServiceByName(service).methods_by_name[method]
    request, response = (message_factory.GetMessageClass(t) for t in (m.input_type, m.output_type))
    call = (channel.unary_stream if m.server_streaming else channel.unary_unary)(
        f"/{service}/{method}", request_serializer=request.SerializeToString, response_deserializer=response.FromString)
    return call, request


def listed(channel) -> dict[str, int]:
    answer = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    return {name: r.status for name, r in answer.statuses.items()}


def services(channel) -> set[str]:
    return set(ProtoReflectionDescriptorDatabase(channel).get_services())


# --- an expert shard --------------------------------------------------------------------------
def test_a_shard_process_speaks_health_and_reflection_and_goes_not_serving_as_it_drains(tiny_ckpt):
    with running_shards(tiny_ckpt, [[0, 3]], layers=[1]) as (shard,):
        with grpc.insecure_channel(shard.address) as ch:
            assert check(ch, "") == check(ch, EXPERT) == SERVING
            assert listed(ch) == {"": SERVING, EXPERT: SERVING}
            with pytest.raises(grpc.RpcError) as unknown:
                check(ch, GENERATION)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert services(ch) == {EXPERT, HEALTH, REFLECTION}
            info, request = reflected(ch, EXPERT, "Info")
            got = json_format.MessageToDict(info(request(), timeout=10), preserving_proto_field_name=True)
            assert got["shard_id"] == "g0" and got["layers"] == [{"layer": 1, "experts": [0, 3]}]
            assert got["hidden_size"] == 64

            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=EXPERT), timeout=60)
            assert next(watch).status == SERVING
            shard.process.send_signal(signal.SIGTERM)          # what Serve and Kubernetes send
            assert next(watch).status == NOT_SERVING
            assert shard.process.wait(30) == 0


def test_health_and_reflection_need_no_shard_token_everything_else_does(tiny_ckpt):
    async def run():
        server, port = await serve(tiny_ckpt, [1], layers=[0], access=ShardAccess(token="s3cret"))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=EXPERT), timeout=10)
                listed = [r async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)]
                info = ch.unary_unary(INFO, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await info(b"", timeout=10)
            await server.drain(grace=1)
            return health.status, listed, refused.value.code()
        finally:
            await server.stop(0)
    status, listed, refused = asyncio.run(run())
    assert status == SERVING and refused == grpc.StatusCode.UNAUTHENTICATED
    assert {s.name for s in listed[0].list_services_response.service} == {EXPERT, HEALTH, REFLECTION}


# --- the front door -------------------------------------------------------------------------
def _run(loop, coro, timeout: float = 120):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(scope="module")
def front_door(loop, tiny_ckpt, one_thread):
    """The grpc.aio front door over an engine whose one expert group is a shard process."""
    with running_shards(tiny_ckpt, [list(range(8))]) as (shard,):
        async def build():
            ckpt = Checkpoint(tiny_ckpt)
            mc = ckpt.config
            placement = Placement.by_expert([list(range(8))], mc.num_hidden_layers, mc.num_local_experts)
            transport = GrpcTransport([[shard.address]], timeout=10)
            engine, tok = open_engine(ckpt, EngineConfig(), transport, placement)
            backend = LocalBackend(AsyncEngine(engine, tok), "tiny")
            server, port = await start_grpc_server(backend)
            return backend, transport, server, port
        backend, transport, server, port = _run(loop, build())
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                yield ch, transport, shard
        finally:
            _run(loop, server.stop(None))
            _run(loop, backend.close())


async def _set_replicas(transport: GrpcTransport, group: int, addresses: list[str]) -> None:
    transport.set_replicas(group, addresses)       # as the attention replica does from the directory


def test_front_door_health_follows_every_group_having_a_live_replica(front_door, loop):
    ch, transport, shard = front_door
    stub = health_pb2_grpc.HealthStub(ch)
    assert check(ch, "") == check(ch, GENERATION) == SERVING
    assert listed(ch) == {"": SERVING, GENERATION: SERVING}
    with pytest.raises(grpc.RpcError) as unknown:
        check(ch, EXPERT)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert next(stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)).status == \
        health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    watch = stub.Watch(health_pb2.HealthCheckRequest(service=GENERATION), timeout=60)
    try:
        assert next(watch).status == SERVING
        _run(loop, _set_replicas(transport, 0, []))      # the group's last replica is gone
        assert next(watch).status == NOT_SERVING
        assert check(ch, "") == NOT_SERVING and listed(ch) == {"": NOT_SERVING, GENERATION: NOT_SERVING}
        _run(loop, _set_replicas(transport, 0, [shard.address]))
        assert next(watch).status == SERVING
    finally:
        watch.cancel()


def test_front_door_reflection_is_all_a_client_needs_to_generate(front_door):
    ch, _, _ = front_door
    assert services(ch) == {GENERATION, HEALTH, REFLECTION}
    generate, request = reflected(ch, GENERATION, "Generate")
    fields = {"text": "The capital of France is", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    got = [t for r in generate(json_format.ParseDict(fields, request()), timeout=60) for t in r.token_ids]
    typed = ggrpc.GenerationStub(ch).Generate(gpb.GenerateRequest(**fields), timeout=60)
    assert len(got) == 5 and got == [t for r in typed for t in r.token_ids]
