"""OpenAI-compatible HTTP: real uvicorn servers, the real `openai` client, raw HTTP for bad input."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
from fastapi.testclient import TestClient
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, Tool

from attention_service.async_engine import Delta
from attention_service.errors import RequestError
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer
from cluster.api.backend import LocalBackend, token_text
from cluster.api.chat import ChatReply, chat_prompt, parse_tool_calls, tool_calls_token
from cluster.api.openai_api import build_openai_app
from cluster.local import build_engine
from cluster.tools.harness import serving
from mixtral.config import preset

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def v1(tiny_ckpt):
    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny")
    with serving(build_openai_app(backend)) as url:
        yield url, backend, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def v3(make_ckpt):
    ckpt = make_ckpt(preset("tiny-v3"))
    backend = LocalBackend.from_checkpoint(ckpt, model_name="tiny-v3")
    with serving(build_openai_app(backend)) as url:
        yield url, backend, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), ckpt


def reference(ckpt, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    """Greedy tokens from a fresh in-process engine, and their text as a continuation of the prompt."""
    engine, tok = build_engine(ckpt)
    (seq,) = asyncio.run(engine.generate([prompt_ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    ctx = prompt_ids[-6:]
    return seq.output_ids, tok.decode(ctx + seq.output_ids)[len(tok.decode(ctx)):]


def post(url: str, body: bytes | dict, path: str = "/v1/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.mark.parametrize("as_ids", [False, True])
def test_greedy_completion_equals_the_in_process_engine(v1, tiny_ckpt, as_ids):
    _, backend, client = v1
    text = "The capital of France is"
    ids = backend.tokenizer.encode(text)
    out = client.completions.create(model="tiny", prompt=ids if as_ids else text, max_tokens=10, logprobs=2, **GREEDY)
    ref_ids, ref_text = reference(tiny_ckpt, ids, 10)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    assert choice.text == ref_text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [token_text(backend.tokenizer, i) for i in ref_ids]
    assert len(choice.logprobs.top_logprobs[0]) == 2 and choice.logprobs.text_offset[0] == 0
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 10, len(ids) + 10)


def test_streamed_completion_concatenates_to_the_whole_one(v1):
    _, _, client = v1
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_strings_and_max_tokens(v1):
    _, _, client = v1
    free = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, **GREEDY).choices[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    stopped = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, stop=stop, **GREEDY)
    assert stopped.choices[0].text == free.text[:free.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < 24
    short = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, **GREEDY)
    assert short.usage.completion_tokens == 3 and free.text.startswith(short.choices[0].text)


def test_chat_prompt_is_mistral_commons_encoding_and_streams_the_same(v3):
    _, backend, client, ckpt = v3
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = chat_prompt(backend.tokenizer, msgs)
    expected = backend.tokenizer.mistral.encode_chat_completion(ChatCompletionRequest.from_openai(msgs)).tokens
    assert ids == expected
    whole = client.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=10, **GREEDY)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.choices[0].message.content == reference(ckpt, ids, 10)[1]
    chunks = list(client.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=10, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tools_reach_the_v3_prompt(v3):
    _, backend, client, _ = v3
    tok = backend.tokenizer
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    ids = chat_prompt(tok, msgs, [WEATHER])
    expected = tok.mistral.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="Weather in Paris?")],
        tools=[Tool(function=Function(**WEATHER["function"]))])).tokens
    assert ids == expected
    assert tok.mistral.instruct_tokenizer.tokenizer.get_special_token("[AVAILABLE_TOOLS]") in ids
    assert "get_weather" in tok.decode(ids)
    out = client.chat.completions.create(model="tiny-v3", messages=msgs, tools=[WEATHER], max_tokens=4, **GREEDY)
    assert out.usage.prompt_tokens == len(ids)
    # A conversation with a call and its result, under OpenAI-style ids the v3 template would refuse.
    call = {"id": "call_Xy7_0123456789", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = msgs + [{"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"], "content": "22C"}]
    out = client.chat.completions.create(model="tiny-v3", messages=turn, tools=[WEATHER], max_tokens=2, **GREEDY)
    assert out.usage.prompt_tokens == len(chat_prompt(tok, turn, [WEATHER])) > len(ids)


def test_tool_call_output_is_parsed_into_openai_tool_calls(v3):
    tok = v3[1].tokenizer
    marker = tool_calls_token(tok)
    assert marker == tok.mistral.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
    ids = [marker] + tok.encode(' [{"name": "get_weather", "arguments": {"city": "Paris"}}]', bos=False) + [tok.eos_id]
    text = tok.decode(ids)                                 # the marker and EOS decode to nothing
    (call,) = parse_tool_calls(ids, text, marker)
    assert call["type"] == "function" and len(call["id"]) == 9 and call["id"].isalnum()
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_tool_calls(ids[1:], text, marker) is None            # no marker: plain content
    assert parse_tool_calls(ids, text[:-3], marker) is None           # marker, but not JSON
    assert parse_tool_calls(ids, "[{\"arguments\": {}}]", marker) is None  # no function name
    # The reply, streamed in three pieces: nothing until complete, then one tool_calls delta.
    cut = [ids[:1], ids[1:5], ids[5:]]
    deltas = [Delta(c, tok.decode(c) if i else "", "stop" if i == 2 else None, None, 20, sum(map(len, cut[:i + 1])))
              for i, c in enumerate(cut)]
    reply = ChatReply("m", tok, [WEATHER], None, False)
    chunks = [c for d in deltas for c in reply.chunks(d)]
    assert len(chunks) == 1 and chunks[0]["choices"][0]["finish_reason"] == "tool_calls"
    streamed = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert streamed["index"] == 0 and streamed["function"]["name"] == "get_weather"
    whole = ChatReply("m", tok, [WEATHER], None, False).whole(deltas)["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    # Calls we produced go back into the next turn as they are.
    back = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": whole["message"]["tool_calls"]},
            {"role": "tool", "tool_call_id": whole["message"]["tool_calls"][0]["id"], "content": "22C"}]
    assert chat_prompt(tok, back, [WEATHER])
    # tool_choice "none" and a v1 tokenizer leave the same output as content.
    none = ChatReply("m", tok, [WEATHER], "none", False).whole(deltas)["choices"][0]
    assert none["finish_reason"] == "stop" and none["message"]["content"] == text


def test_tools_with_a_v1_model_are_refused(v1):
    url, backend, _ = v1
    assert tool_calls_token(backend.tokenizer) is None
    status, body = post(url, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
                        "/v1/chat/completions")
    assert status == 400 and body["error"]["param"] == "tools" and "v1" in body["error"]["message"]


def test_models_and_health(v1):
    url, _, client = v1
    (m,) = client.models.list().data
    assert (m.id, m.object, m.owned_by) == ("tiny", "model", "moe-serve")
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}


@pytest.mark.parametrize("body,status,param,words", [
    (b'{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    ({"prompt": "hi"}, 400, "model", "required"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "does not exist"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "at least 1"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "temperature", "finite"),
    ({"model": "tiny", "prompt": "hi", "n": 99}, 400, "n", "n may be 16 at most"),
    ({"model": "tiny", "prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of", "at least n"),
    ({"model": "tiny", "prompt": "hi", "best_of": 0}, 400, "best_of", "at least n"),
    ({"model": "tiny", "prompt": "hi", "best_of": 17}, 400, "best_of", "best_of may be 16 at most"),
    ({"model": "tiny", "prompt": "hi", "best_of": 3, "stream": True}, 400, "best_of", "cannot be streamed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "best_of": 2}, 400, "best_of",
     "unknown field"),
    ({"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo", "not supported"),
    ({"model": "tiny", "prompt": "hi", "typical_p": 0.5}, 400, "typical_p", "unknown field"),
    ({"model": "tiny", "prompt": "hi", "tools": []}, 400, "tools", "unknown field"),
    ({"model": "tiny", "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100]"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"32000": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}},
     400, "response_format", "must be 'text', 'json_object' or 'json_schema'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     400, "tool_choice", "needs tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "guided_json": {}},
     400, "guided_json", "unknown field"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False},
     400, "parallel_tool_calls", "not supported"),
    ({"model": "tiny", "prompt": [1, 32000]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "tiny", "prompt": [], "max_tokens": 1}, 400, "prompt", "empty"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 65536}, 400, "prompt", "the model's context is 65536"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages", "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", "invalid conversation"),
])
def test_bad_requests_get_openai_errors_and_the_server_carries_on(v1, body, status, param, words):
    url, _, client = v1
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, err = post(url, body, path)
    assert got == status
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    assert words in err["error"]["message"]
    assert client.completions.create(model="tiny", prompt="still here?", max_tokens=2).usage.completion_tokens == 2


def test_nulls_mean_defaults(v1):
    url, _, _ = v1
    status, body = post(url, {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": None, "top_p": None,
                              "stream": None, "logprobs": None, "n": None, "stop": None, "top_k": -1})
    assert status == 200 and body["usage"]["completion_tokens"] == 2 and body["choices"][0]["logprobs"] is None


def test_extreme_top_k_harms_nobody_in_its_step(v1, tiny_ckpt):
    """top_k of 2^63 and more, 0 and -1 mean no cut; innocent streams sharing the step are untouched."""
    url, _, _ = v1

    async def run():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        innocents = [aclient.completions.create(model="tiny", prompt=[1, 22, 33], max_tokens=24, stream=True,
                                                **GREEDY) for _ in range(4)]
        odd = [aclient.completions.create(model="tiny", prompt="hi", max_tokens=8, extra_body={"top_k": k})
               for k in (2**63, 2**64 + 5, 0, -1)]
        streams, odd = await asyncio.gather(asyncio.gather(*innocents), asyncio.gather(*odd))
        texts = []
        for s in streams:
            texts.append("".join([c.choices[0].text async for c in s]))
        await aclient.close()
        return texts, odd

    texts, odd = asyncio.run(run())
    assert all(o.usage.completion_tokens == 8 for o in odd)
    _, want_text = reference(tiny_ckpt, [1, 22, 33], 24)
    assert texts == [want_text] * 4


def test_the_openai_client_sees_typed_errors(v1):
    _, _, client = v1
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", n=3, best_of=2)
    assert e.value.body["param"] == "best_of"


def _idle(backend: LocalBackend, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ae = backend.engine
        if ae.num_running == 0 and ae.num_waiting == 0 and ae.engine.blocks.num_free == ae.engine.blocks.num_blocks:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(v1, stream):
    url, backend, _ = v1
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "Go on forever", "max_tokens": 60000, "ignore_eos": True,
                       "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            assert b"data: " in s.recv(4096)
        deadline = time.monotonic() + 10
        while backend.engine.num_running == 0:                  # generating, 60000 tokens to go
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert _idle(backend), "the request kept running after its client left"


class ScriptedBackend:
    """Plays back deltas as dicts (what arrives through a Ray handle), or raises."""

    model_name, max_model_len = "fake", 128

    def __init__(self, tokenizer: Tokenizer, script: list):
        self.tokenizer, self.script = tokenizer, script

    async def stream(self, prompt_ids, params):
        for step in self.script:
            if isinstance(step, Exception):
                raise step
            yield step


def test_engine_failures_become_error_events_or_bodies(tiny_ckpt):
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    hi = Delta([22557], " Hi", prompt_tokens=3, completion_tokens=1)
    cases = {"error": [hi, Delta([], "", "error", prompt_tokens=3, completion_tokens=1, error="shard lost")],
             "raise": [hi, RuntimeError("replica died")],
             "refuse": [RequestError("needs more KV cache than it holds", "max_tokens")]}
    for name, script in cases.items():
        client = TestClient(build_openai_app(ScriptedBackend(tok, script)))
        req = {"model": "fake", "prompt": "hi", "max_tokens": 4}
        r = client.post("/v1/completions", json={**req, "stream": True})
        if name == "refuse":                                   # refused before the first delta: a clean 400
            assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
            continue
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert json.loads(events[0])["choices"][0]["text"] == " Hi"
        assert json.loads(events[1])["error"]["type"] == "server_error" and events[2:] == ["[DONE]"]
        r = client.post("/v1/completions", json=req)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
