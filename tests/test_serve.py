"""The product end to end on Ray Serve (CPU): OpenAI HTTP and gRPC in, expert groups over gRPC."""

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import ray
from ray import serve

from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from cluster.tools.harness import running_app
from protos import generation_pb2 as gpb
from protos import generation_pb2_grpc as ggrpc

pytestmark = pytest.mark.e2e   # starts a Ray cluster and the whole app

PROMPT_IDS = [1, 415, 5565, 302, 4843]


@pytest.fixture(scope="module")
def app(tiny_ckpt):
    # Group 0 runs two replicas so one can die while streams run (bounds keep the policy from
    # scaling it down meanwhile).
    with running_app(tiny_ckpt, expert_groups=[{"experts": [0, 2, 4, 6], "replicas": 2,
                                                "scaling": {"min_replicas": 2, "max_replicas": 2}},
                                               {"experts": [1, 3, 5, 7]}]) as (cfg, url, grpc_target):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield cfg, url, grpc_target, client, client.models.list().data[0].id


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    engine, tok = build_engine(tiny_ckpt)

    def greedy(ids, n, **kw):
        (s,) = asyncio.run(engine.generate([ids], SamplingParams(max_tokens=n, temperature=0, **kw)))
        return s.output_ids
    return greedy, tok


def test_completions_match_the_in_process_engine(app, local):
    _, _, _, client, model = app
    greedy, tok = local
    r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0)
    expected = greedy(PROMPT_IDS, 10)
    ctx = PROMPT_IDS[-6:]
    assert r.choices[0].text == tok.decode(ctx + expected)[len(tok.decode(ctx)):]
    assert r.usage.completion_tokens == len(expected) and r.usage.prompt_tokens == len(PROMPT_IDS)

    text = client.completions.create(model=model, prompt="The experts are", max_tokens=8, temperature=0)
    ids = tok.encode("The experts are")
    assert text.choices[0].text == tok.decode(ids[-6:] + greedy(ids, 8))[len(tok.decode(ids[-6:])):]

    chunks = list(client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text

    # n choices over the Serve handle: every one arrives, whole and streamed.
    both = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0, n=2)
    assert [c.text for c in both.choices] == [r.choices[0].text] * 2 and both.usage.completion_tokens == 20
    chunks = list(client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0, n=2,
                                            stream=True))
    for i in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == r.choices[0].text
    # best_of: the best two of three candidates (greedy, so alike), every candidate's tokens billed.
    best = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0, n=2, best_of=3)
    assert [c.text for c in best.choices] == [r.choices[0].text] * 2 and best.usage.completion_tokens == 30


def test_chat_streams_and_stops(app):
    _, _, _, client, model = app
    msgs = [{"role": "user", "content": "Name three experts."}]
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}     # 12 tokens, whatever the random model says
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, **greedy)
    streamed = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, stream=True, **greedy)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == full.choices[0].message.content and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    content = full.choices[0].message.content
    assert len(content) > 4
    stop = content[2:4]
    cut = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, stop=[stop], **greedy)
    assert cut.choices[0].message.content == content[:content.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_grpc_generation_through_serve(app, local):
    _, _, target, _, _ = app
    greedy, _ = local

    async def run():
        async with grpc.aio.insecure_channel(target) as ch:
            stub = ggrpc.GenerationStub(ch)
            req = gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=PROMPT_IDS), max_tokens=9, temperature=0)
            ids, last = [], None
            async for r in stub.Generate(req):
                ids += list(r.token_ids)
                last = r
            bad = gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=[1, 99999]), max_tokens=3)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(bad):
                    pass
            return ids, last, err.value
    ids, last, err = asyncio.run(run())
    assert ids == greedy(PROMPT_IDS, 9) and last.finish_reason == "length"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "99999" in err.details()


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,status,words", [
    (b'{"model": ', 400, "JSON"),
    (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404, "no-such-model"),
    (None, 400, "max_tokens"),                            # negative max_tokens
    ("over", 400, "context"),                             # prompt over the context
])
def test_bad_requests_get_openai_errors_and_the_app_keeps_serving(app, body, status, words):
    cfg, url, _, client, model = app
    if body is None:
        body = json.dumps({"model": model, "prompt": "x", "max_tokens": -3}).encode()
    elif body == "over":
        body = json.dumps({"model": model, "prompt": [1] * 65530, "max_tokens": 100}).encode()
    code, payload = _post(f"{url}/v1/completions", body)
    assert code == status and words in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=model, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_streams_survive_an_expert_replica_being_killed(app, local):
    cfg, url, _, _, model = app
    greedy, _ = local
    prompts = [[1] + list(range(700 + 13 * i, 700 + 13 * i + 5 + 7 * i)) for i in range(6)]
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "ExpertGroup-0" in a["name"] and "REPLICA" in a["name"])

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        started = asyncio.Event()

        async def one(p):
            out = []
            stream = await aclient.completions.create(model=model, prompt=p, max_tokens=200, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
            async for c in stream:
                out.append(c)
                if len(out) == 3:
                    started.set()
            return "".join(c.choices[0].text for c in out if c.choices), out[-1]

        async def killer():
            await started.wait()
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
            for _ in range(100):                 # until the process is really gone
                try:
                    ray.get_actor(victim["name"], namespace=victim["namespace"])
                except ValueError:
                    break
                await asyncio.sleep(0.1)
            return sum(not t.done() for t in streams)
        streams = [asyncio.ensure_future(one(p)) for p in prompts]
        still_running = await killer()
        return await asyncio.gather(*streams), still_running

    results, still_running = asyncio.run(run())
    assert still_running > 0                         # the replica died under live streams
    _, tok = local
    for p, (text, last) in zip(prompts, results):
        ids = greedy(p, 200, ignore_eos=True)
        assert text == tok.decode(p[-6:] + ids)[len(tok.decode(p[-6:])):]
        assert last.choices[0].finish_reason == "length"
    load = serve.get_deployment_handle("Attention", app_name=cfg.name).load.remote().result()
    assert load["failovers"] >= 1                    # batches really were re-sent to the other replica
