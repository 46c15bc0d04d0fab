"""The front doors' gate: API keys, body size, content type, field bounds, default max_tokens,
overload (429 / RESOURCE_EXHAUSTED with Retry-After), the 503 mapping and /ready. Real
uvicorn and grpc.aio servers over an in-process engine, the real `openai` client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import pickle
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from fastapi.testclient import TestClient

from attention_service.async_engine import Delta
from attention_service.config import EngineConfig
from attention_service.errors import Overloaded, Unavailable
from attention_service.tokenizer import Tokenizer
from cluster.api.access import ApiKeys, is_loopback, require_keys
from cluster.api.backend import LocalBackend
from cluster.api.grpc_api import start_grpc_server
from cluster.api.limits import RequestLimits
from cluster.api.openai_api import build_openai_app
from cluster.tools.harness import serving
from mixtral.config import ConfigError
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

KEY = "k-123"
CAP = 5           # default max_tokens in these servers


def http(url: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
         content_type: str = "application/json", method: str | None = None) -> tuple[int, dict, dict]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def _backend(ckpt) -> LocalBackend:
    """With a key, small limits, one running sequence and one waiting at most."""
    return LocalBackend.from_checkpoint(
        ckpt, EngineConfig(max_num_seqs=1), model_name="tiny", api_keys=ApiKeys([KEY, "other-key"]),
        limits=RequestLimits(max_body_bytes=64 << 10, default_max_tokens=CAP, retry_after_s=7), max_waiting=1)


@pytest.fixture(scope="module")
def door(tiny_ckpt, loop):
    """Both doors, each over an engine of its own (an engine runs on one event loop, each server has its own)."""
    http_backend, grpc_backend = _backend(tiny_ckpt), _backend(tiny_ckpt)
    server, port = asyncio.run_coroutine_threadsafe(start_grpc_server(grpc_backend), loop).result(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GenerationStub(channel)
    stub.channel = channel
    with serving(build_openai_app(http_backend)) as url:
        yield url, stub, http_backend, grpc_backend
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)


AUTH = [("authorization", f"Bearer {KEY}")]


def test_api_keys_guard_every_route_but_health_and_ready(door):
    url, stub, _, _ = door
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    for key in (None, "wrong", KEY + "x"):
        status, headers, err = http(url, "/v1/completions", body, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    for path in ("/docs", "/openapi.json", "/v1/models", "/metrics"):
        assert http(url, path, key=None)[0] == 401
    assert http(url, "/openapi.json")[0] == 200 and http(url, "/v1/completions", body, key="other-key")[0] == 200
    assert http(url, "/health", key=None)[:3:2] == (200, {"status": "ok"})
    assert http(url, "/ready", key=None)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).completions.create(model="tiny", prompt="x")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    # gRPC: the same keys, as metadata.
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="hi", max_tokens=1), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="hi", max_tokens=1), metadata=[("authorization", "Bearer x")]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(stub.Generate(pb.GenerateRequest(text="hi", max_tokens=1), metadata=AUTH))[-1].finish_reason


@pytest.mark.parametrize("body,content_type,status,code", [
    (b'{"model": "tiny", "prompt": "' + b"x" * (65 << 10) + b'"}', "application/json", 413, "request_too_large"),
    (b'{"model": "tiny", "prompt": "hi"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"model": "tiny", "prompt": "hi"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"model": "tiny", "prompt": "\\ud83d"}', "application/json", 400, None),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400, None),
    (b"[" * 20000 + b"]" * 20000, "application/json", 400, None),
    (b'{"model": "tiny", "prompt": "hi", "seed": 36893488147419103232}', "application/json", 400, None),
    (b'{"model": "tiny", "prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p",'
     b'"q"]}', "application/json", 400, None),
    (b'{"model": "tiny", "prompt": "hi", "stop_token_ids": [32000]}', "application/json", 400, None),
])
def test_http_bounds(door, body, content_type, status, code):
    url, _, _, _ = door
    got, _, err = http(url, "/v1/completions", body, content_type=content_type)
    assert got == status and err["error"]["code"] == code, err
    assert http(url, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 1})[0] == 200


def test_a_lone_surrogate_names_its_field(door):
    url, stub, _, _ = door
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udc00"}]}'
    status, _, err = http(url, "/v1/chat/completions", raw)
    assert status == 400 and err["error"]["param"] == "messages" and "surrogate" in err["error"]["message"]
    # gRPC: a string that is not UTF-8 (an encoded surrogate) does not parse: INVALID_ARGUMENT, not UNKNOWN.
    good = pb.GenerateRequest(text="hi", max_tokens=1).SerializeToString()
    raw_call = stub.channel.unary_stream("/moe_serve.generation.v1.Generation/Generate",
                                                    request_serializer=None)
    with pytest.raises(grpc.RpcError) as e:
        list(raw_call(good.replace(b"hi", b"\xed\xa0"), metadata=AUTH, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()


def test_default_max_tokens_is_the_configured_cap_not_the_context(door):
    url, stub, _, _ = door
    status, _, out = http(url, "/v1/chat/completions", {"model": "tiny", "ignore_eos": True,
                                                        "messages": [{"role": "user", "content": "Go on"}]})
    assert status == 200 and out["usage"]["completion_tokens"] == CAP and out["choices"][0]["finish_reason"] == "length"
    last = list(stub.Generate(pb.GenerateRequest(text="Go on", ignore_eos=True), metadata=AUTH))[-1]
    assert last.usage.completion_tokens == CAP


def _until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_full_queue_is_refused_with_429_and_retry_after(door):
    """One sequence runs, one waits; the next request is refused at once, on either door."""
    url, stub, http_backend, grpc_backend = door
    long = {"model": "tiny", "prompt": "Go on", "max_tokens": 2000, "stream": True, "extra_body": {"ignore_eos": True}}
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    first = client.completions.create(**long)
    next(iter(first))                                                        # running
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        second = pool.submit(client.completions.create, **long)
        _until(lambda: http_backend.engine.num_waiting == 1)                 # waiting
        status, headers, err = http(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})
        first.close()
        second.result().close()
    assert status == 429 and headers["retry-after"] == "7" and err["error"]["type"] == "rate_limit_error"

    req = pb.GenerateRequest(text="Go on", max_tokens=2000, ignore_eos=True)
    # The second is sent once the first streams: sent together, either could run first.
    calls = [stub.Generate(req, metadata=AUTH, timeout=60)]
    next(calls[0])                                                           # running
    calls.append(stub.Generate(req, metadata=AUTH, timeout=60))
    _until(lambda: grpc_backend.engine.num_waiting == 1)
    refused = stub.Generate(pb.GenerateRequest(text="hi", max_tokens=1), metadata=AUTH, timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        list(refused)
    for c in calls:
        c.cancel()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "7") in tuple(refused.trailing_metadata())


class Scripted:
    """A backend that plays back deltas or raises: the engine's failures as a front door sees them."""

    model_name, max_model_len = "fake", 128
    api_keys, limits = ApiKeys(), RequestLimits(retry_after_s=3)

    def __init__(self, tokenizer: Tokenizer, script: list, ready: bool = True):
        self.tokenizer, self.script, self._ready = tokenizer, script, ready

    async def stream(self, prompt_ids, params):
        for step in self.script:
            if isinstance(step, Exception):
                raise step
            yield step

    async def ready(self):
        return self._ready, {"expert_replicas": [1, int(self._ready)]}


def test_unavailable_and_overloaded_map_to_503_and_429_with_retry_after(tiny_ckpt):
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    gone = Delta([], "", "error", prompt_tokens=3, error="expert group 1 has no live replica",
                 error_code="unavailable")
    hi = Delta([22557], " Hi", prompt_tokens=3, completion_tokens=1)
    req = {"model": "fake", "prompt": "hi", "max_tokens": 4}
    for script, status in (([gone], 503), ([Unavailable("no attention replica", 3)], 503),
                           ([Overloaded("queue full", 3)], 429)):
        for stream in (False, True):
            r = TestClient(build_openai_app(Scripted(tok, script))).post("/v1/completions",
                                                                        json={**req, "stream": stream})
            assert r.status_code == status and r.headers["retry-after"] == "3", r.text
    # After the first token: the stream says why it broke, in OpenAI's error shape.
    for script in ([hi, gone], [hi, Unavailable("the attention replica died", 3)]):
        r = TestClient(build_openai_app(Scripted(tok, script))).post("/v1/completions", json={**req, "stream": True})
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert json.loads(events[0])["choices"][0]["text"] == " Hi" and events[-1] == "[DONE]"
        assert json.loads(events[1])["error"]["code"] == "service_unavailable"
    client = TestClient(build_openai_app(Scripted(tok, [], ready=False)))
    r = client.get("/ready")
    assert r.status_code == 503 and r.json() == {"status": "not ready", "expert_replicas": [1, 0]}
    assert client.get("/health").status_code == 200


def test_keys_and_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.2", "my-host"]))
    with pytest.raises(ConfigError, match="API key"):
        require_keys("0.0.0.0", ApiKeys.resolve([], env={}))
    require_keys("127.0.0.1", ApiKeys.resolve([], env={}))
    keys = ApiKeys.resolve(["a"], env={"MOE_SERVE_API_KEY": "b, c"})
    require_keys("0.0.0.0", keys)
    assert [keys.allows(k) for k in ("a", "b", "c", "d", "", None)] == [True, True, True, False, False, False]
    assert keys.allows_header("Bearer c") and keys.allows_header("bearer  b") and not keys.allows_header("c")
    assert "a" not in repr(keys) and pickle.loads(pickle.dumps(keys)).allows("b")
    assert ApiKeys().allows(None)                                # no keys: the door is open


def test_the_readme_config_decodes_and_the_app_needs_a_key_beyond_loopback(tiny_ckpt, monkeypatch):
    from pathlib import Path

    import yaml

    from cluster.serve import app_config
    from cluster.serve.builder import build_app

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Configuration")[1].split("```yaml\n")[1].split("```")[0]
    cfg = app_config.decode(yaml.safe_load(block), "README")
    assert (cfg.limits.default_max_tokens, cfg.attention.max_queued_requests, cfg.attention.expert_wait_s) == \
        (2048, 64, 30) and cfg.api_keys == [] and cfg.expert_tls is None
    for bad, words in (({"limits": {"max_body_bytes": 0}}, "max_body_bytes"),
                       ({"attention": {"max_queued_requests": -1}}, "max_queued_requests"),
                       ({"expert_tls": {"ca_file": "ca.pem"}}, "cert_file")):
        with pytest.raises(ConfigError, match=words):
            app_config.decode(bad)
    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="API key"):
        build_app(app_config.decode({"http_host": "0.0.0.0"}), str(tiny_ckpt))
    build_app(app_config.decode({"http_host": "0.0.0.0", "api_keys": ["k"]}), str(tiny_ckpt))
    monkeypatch.setenv("MOE_SERVE_API_KEY", "from-a-secret")
    build_app(app_config.decode({"http_host": "0.0.0.0"}), str(tiny_ckpt))
