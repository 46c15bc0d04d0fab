"""Responses as the `openai` package's own types read them: whole, streamed, with usage, with n > 1
and logprobs; and the sampling controls through the real client."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from attention_service.sampling_params import SamplingParams
from cluster.api.backend import LocalBackend
from cluster.api.openai_api import build_openai_app
from cluster.local import build_engine
from cluster.tools.harness import serving

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def app(tiny_ckpt):
    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny")
    with serving(build_openai_app(backend)) as url:
        yield backend, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def _raw(call, **kw) -> dict:
    return json.loads(call.with_raw_response.create(**kw).text)


def _events(call, **kw) -> list[dict]:
    """A stream's data events, parsed, up to [DONE]."""
    with call.with_streaming_response.create(stream=True, **kw) as r:
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _chunk(event: dict) -> Completion:
    """A streamed completion chunk as `Completion`. The type declares finish_reason non-null,
    yet OpenAI's streams (and ours) send null until a choice's last chunk, and the SDK reads
    chunks without validating them: the rest of the chunk is validated, the null kept."""
    nulls = [c["finish_reason"] is None for c in event["choices"]]
    chunk = Completion.model_validate({**event, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                                            for c in event["choices"]]})
    for c, null in zip(chunk.choices, nulls):
        if null:
            c.finish_reason = None
    return chunk


def test_completion_with_n_and_logprobs_is_an_openai_completion(app):
    backend, client = app
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0.9, seed=5, logprobs=2,
              extra_body={"ignore_eos": True})
    out = Completion.model_validate(_raw(client.completions, n=3, **kw))
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:
        assert c.finish_reason == "length" and len(c.logprobs.tokens) == 6
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs) == len(c.logprobs.text_offset) == 6
    assert len({c.text for c in out.choices}) == 3
    n_prompt = len(backend.tokenizer.encode("Once upon a time"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        n_prompt, 18, n_prompt + 18)
    single = Completion.model_validate(_raw(client.completions, **kw))
    assert single.choices[0].text == out.choices[0].text          # choice 0 is the n = 1 request
    # Streamed: every chunk a Completion; each choice's text the whole one's; usage last.
    chunks = [_chunk(e) for e in _events(client.completions, n=3, stream_options={
        "include_usage": True}, **kw)]
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
    assert all(c.usage is None for c in chunks[:-1])
    for i in range(3):
        mine = [ch.choices[0] for ch in chunks[:-1] if ch.choices[0].index == i]
        assert "".join(c.text for c in mine) == out.choices[i].text
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert [t for c in mine for t in c.logprobs.tokens] == out.choices[i].logprobs.tokens


def test_chat_with_n_and_logprobs_is_an_openai_chat_completion(app):
    _, client = app
    kw = dict(model="tiny", messages=CHAT, max_tokens=5, temperature=0.8, seed=9, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    out = ChatCompletion.model_validate(_raw(client.chat.completions, n=2, **kw))
    assert out.object == "chat.completion" and [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        assert c.message.role == "assistant" and c.finish_reason == "length"
        assert len(c.logprobs.content) == 5 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert out.usage.completion_tokens == 10
    events = _events(client.chat.completions, n=2, stream_options={"include_usage": True}, **kw)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks[:-1] if ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == out.choices[i].message.content
        assert [t.token for c in mine if c.logprobs for t in c.logprobs.content] == [
            t.token for t in out.choices[i].logprobs.content]
        assert mine[-1].finish_reason == "length"
    # Without include_usage, no usage anywhere.
    plain = _events(client.chat.completions, **{**kw, "max_tokens": 2})
    assert all(ChatCompletionChunk.model_validate(e).usage is None for e in plain)


def test_sampling_controls_through_the_client(app, tiny_ckpt):
    backend, client = app
    tok = backend.tokenizer
    forced = tok.encode(" blue")[-1]
    out = client.completions.create(model="tiny", prompt="Colours:", max_tokens=4, temperature=0.7, seed=1,
                                    logit_bias={str(forced): 100}, extra_body={"ignore_eos": True}, logprobs=0)
    assert out.choices[0].logprobs.tokens == [tok.piece(forced).replace("\u2581", " ")] * 4
    # Penalties reach the engine: the same tokens as the engine given the same parameters.
    kw = dict(presence_penalty=1.5, frequency_penalty=1.0)
    ids = tok.encode("one one one one")
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.3, "min_p": 0.1}, **kw)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.3, min_p=0.1, **kw)
    (seq,) = asyncio.run(build_engine(tiny_ckpt)[0].generate([ids], params))
    assert got.choices[0].logprobs.tokens == [tok.piece(t).replace("\u2581", " ") for t in seq.output_ids]


def test_many_stop_strings_end_at_the_first_found(app):
    _, client = app
    kw = dict(model="tiny", prompt="The story goes", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**kw).choices[0].text
    words = free.split()
    assert len(words) >= 4
    late, early = words[-2], words[1]
    decoys = [f"zz{i}qq" for i in range(14)]
    out = client.completions.create(stop=decoys + [late, early], **kw).choices[0]
    cut = min(free.find(late), free.find(early))
    assert out.finish_reason == "stop" and out.text == free[:cut]


def test_unknown_and_unsupported_fields_are_typed_errors(app):
    _, client = app
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "use_beam_search"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "response_format"
    # Sent by clients by default, meaningless here: accepted.
    ok = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1, user="u", metadata={"a": "b"},
                                        store=False, service_tier="auto", response_format={"type": "text"},
                                        parallel_tool_calls=True)
    assert ok.usage.completion_tokens == 1


def test_every_field_the_sdk_can_send_is_known_and_documented():
    """Each field of the SDK's request types is declared (honoured, or refused by name); the
    accepted-and-ignored ones are listed in docs/api.md."""
    from pathlib import Path
    from typing import get_type_hints

    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    from cluster.api.openai_api import ChatRequest, CompletionRequest
    from cluster.api.request_fields import IGNORED, ONLY_DEFAULT

    for ours, theirs in ((CompletionRequest, completion_create_params.CompletionCreateParamsBase),
                         (ChatRequest, chat_create_params.CompletionCreateParamsBase)):
        assert set(get_type_hints(theirs)) <= set(ours.model_fields), ours
    doc = Path(__file__).resolve().parent.parent.joinpath("docs", "api.md").read_text()
    for name in [*IGNORED, *ONLY_DEFAULT, *CompletionRequest.model_fields, *ChatRequest.model_fields]:
        assert f"`{name}`" in doc, name
