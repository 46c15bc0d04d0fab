"""The app on Ray Serve under failure and overload: API keys on both doors, the gRPC door bound to
http_host, 429 past the queue, /ready that tells the truth, the only replica of a group and the
Attention replica killed under live streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import ray
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from cluster.tools.harness import running_app
from protos import generation_pb2 as gpb
from protos import generation_pb2_grpc as ggrpc

pytestmark = pytest.mark.e2e

KEY = "e2e-key"
GENERATION = "moe_serve.generation.v1.Generation"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(tiny_ckpt):
    config = dict(api_keys=[KEY], autoscaling={"enabled": False}, limits={"retry_after_s": 2},
                  attention={"max_ongoing_requests": 4, "max_queued_requests": 2, "expert_wait_s": 120},
                  expert_groups=[{"experts": [0, 2, 4, 6]}, {"experts": [1, 3, 5, 7]}])
    with running_app(tiny_ckpt, **config) as (cfg, url, grpc_target):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        yield cfg, url, grpc_target, client, client.models.list().data[0].id


@pytest.fixture(scope="module")
def greedy(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt)

    def run(ids, n):
        (s,) = asyncio.run(engine.generate([ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
        return s.output_ids
    return run


def get(url: str, headers: dict | None = None) -> tuple[int, dict, dict | str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, h, data = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, h, data = e.code, dict(e.headers), e.read()
    return status, h, json.loads(data) if h.get("content-type") == "application/json" else data.decode()


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or AUTH)})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def listening(port: int) -> set[str]:
    """The local addresses sockets listen on at port, from /proc/net/tcp{,6}."""
    out = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/net/{name}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:       # LISTEN
                    raw = bytes.fromhex(addr)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # host-order words
                    ip = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw)
                    out.add(ip.removeprefix("::ffff:"))               # IPv4 on an IPv6 socket
    return out


def replica(deployment: str) -> dict:
    return next(a for a in ray.util.list_named_actors(all_namespaces=True)
                if f"#{deployment}#" in a["name"] and "REPLICA" in a["name"])


def kill(actor: dict) -> None:
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)


def until(what, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := what()):
            return got
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


def test_keys_on_both_doors_and_grpc_bound_to_the_http_host(app):
    cfg, url, target, client, model = app
    status, _, body = get(f"{url}/ready")
    assert status == 200 and body["attention_replicas"] == 1 and body["expert_replicas"] == [1, 1]
    assert post(f"{url}/v1/completions", {"model": model, "prompt": "hi"}, headers={"X": "y"})[0] == 401
    assert get(f"{url}/docs")[0] == 401 and get(f"{url}/docs", AUTH)[0] == 200
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2

    async def call(metadata, text="hi"):
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = ggrpc.GenerationStub(ch)
            try:
                return [r async for r in stub.Generate(gpb.GenerateRequest(text=text, max_tokens=2),
                                                       metadata=metadata)][-1].usage.completion_tokens
            except grpc.aio.AioRpcError as e:
                return e.code()
    assert asyncio.run(call((("application", cfg.name),))) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(call((("application", cfg.name), ("authorization", f"Bearer {KEY}")))) == 2
    assert asyncio.run(call((("application", cfg.name), ("authorization", f"Bearer {KEY}")),
                            text="x" * (cfg.limits.max_body_bytes + 1))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert listening(cfg.grpc_port) == {"127.0.0.1"}

    async def undecodable():       # a string that is not UTF-8: the proxy parses it as the plain server does
        raw = gpb.GenerateRequest(text="hi", max_tokens=1).SerializeToString().replace(b"hi", b"\xed\xa0")
        async with grpc.aio.insecure_channel(target) as ch:
            call = ch.unary_stream("/moe_serve.generation.v1.Generation/Generate", request_serializer=None)
            try:
                return [r async for r in call(raw, metadata=(("application", cfg.name),
                                                             ("authorization", f"Bearer {KEY}")))]
            except grpc.aio.AioRpcError as e:
                return e.code()
    assert asyncio.run(undecodable()) == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_health_and_reflection_through_serves_proxy_with_no_metadata_at_all(app):
    """As a kubelet probe and grpcurl call it: no application name, no key, no .proto."""
    _, _, target, _, _ = app
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", GENERATION):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        db = ProtoReflectionDescriptorDatabase(ch)
        assert set(db.get_services()) >= {GENERATION, "grpc.health.v1.Health"}
        pool = descriptor_pool.DescriptorPool(db)
        assert pool.FindServiceByName(GENERATION).methods_by_name["Generate"].server_streaming
        assert "max_tokens" in pool.FindMessageTypeByName("moe_serve.generation.v1.GenerateRequest").fields_by_name


def test_past_the_queue_requests_get_429_with_retry_after(app):
    _, url, _, _, model = app
    body = {"model": model, "prompt": "Go on", "max_tokens": 120, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(f"{url}/v1/completions", body), range(12)))
    statuses = sorted(s for s, _, _ in answers)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 4 and 429 in statuses, statuses
    refused = next(a for a in answers if a[0] == 429)
    assert refused[1]["retry-after"] == "2" and refused[2]["error"]["type"] == "rate_limit_error"


def test_the_only_replica_of_a_group_dies_and_its_streams_wait_for_the_next(app, greedy):
    _, url, target, _, model = app
    prompts = [[1] + list(range(900 + 17 * i, 910 + 17 * i)) for i in range(3)]
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    seen = {}

    async def one(p, started):
        stream = await aclient.completions.create(model=model, prompt=p, max_tokens=160, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        chunks = []
        async for c in stream:
            chunks.append(c)
            started.set()
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason

    async def watch(ch):        # the front door's gRPC health, as a load balancer watches it
        statuses = []
        async for r in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=GENERATION)):
            statuses.append(r.status)
            if statuses[-2:] == [NOT_SERVING, SERVING]:
                return statuses

    def unready() -> float | None:
        status, _, body = get(f"{url}/ready")
        if status == 503:
            seen["unready_body"] = body
            return time.monotonic() - t0

    async def run():
        nonlocal t0
        started = asyncio.Event()
        streams = [asyncio.ensure_future(one(p, started)) for p in prompts]
        async with grpc.aio.insecure_channel(target) as ch:
            watching = asyncio.ensure_future(watch(ch))
            await started.wait()
            t0 = time.monotonic()
            kill(replica("ExpertGroup-1"))
            seen["unready_after"] = await asyncio.to_thread(until, unready, 30)
            seen["ready_after"] = await asyncio.to_thread(until, lambda: get(f"{url}/ready")[0] == 200 and
                                                          time.monotonic() - t0, 120)
            seen["in_flight_at_recovery"] = sum(not s.done() for s in streams)
            seen["watched"] = await asyncio.wait_for(watching, 30)
        return await asyncio.gather(*streams)
    t0 = 0.0
    results = asyncio.run(run())
    from attention_service.tokenizer import Tokenizer
    tok = Tokenizer.from_checkpoint(app[0].model)
    for p, (text, finish) in zip(prompts, results):
        assert finish == "length" and text == tok.decode(p[-6:] + greedy(p, 160))[len(tok.decode(p[-6:])):]
    assert seen["unready_after"] < 15 and seen["in_flight_at_recovery"] > 0
    assert seen["unready_body"]["groups_without_replica"] == [1]
    assert seen["watched"][0] == SERVING and seen["watched"][-2:] == [NOT_SERVING, SERVING]


def test_a_dead_attention_replica_is_an_error_within_seconds_not_a_silence(app):
    _, url, _, _, model = app
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)

    async def stream():
        s = await aclient.completions.create(model=model, prompt="Go on", max_tokens=3000, stream=True,
                                             extra_body={"ignore_eos": True})
        n = 0
        try:
            async for _ in s:
                n += 1
        except openai.APIError as e:           # the SSE error event
            return n, e
        return n, None

    async def run():
        live = asyncio.ensure_future(stream())
        await asyncio.sleep(2)
        t0 = time.monotonic()
        kill(replica("Attention"))
        n, err = await asyncio.wait_for(live, 30)
        broken_after = time.monotonic() - t0
        t1 = time.monotonic()
        status, headers, body = await asyncio.to_thread(post, f"{url}/v1/completions",
                                                        {"model": model, "prompt": "hi", "max_tokens": 2})
        return n, err, broken_after, (status, headers, body, time.monotonic() - t1)
    n, err, broken_after, (status, headers, body, answered_in) = asyncio.run(run())
    assert n > 0 and err is not None and broken_after < 15
    assert status == 503 and headers["retry-after"] == "2" and answered_in < 15, (status, body)
    until(lambda: post(f"{url}/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})[0] == 200, 180, 2)
