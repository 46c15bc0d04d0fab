"""Structured output under constrained decoding: a random-weight model, which left alone writes
noise, must still answer with JSON that validates, through the real `openai` client.

The schemas bound their strings (maxLength, enum) so that a model with no preference for a
closing quote still ends within max_tokens; what is checked is the grammar, not the model.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
import torch

from attention_service.errors import RequestError
from attention_service.grammar import Grammars, fill_masks
from attention_service.grammar_spec import GrammarSpec
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer
from cluster.api.backend import LocalBackend
from cluster.api.openai_api import build_openai_app
from cluster.local import build_engine
from cluster.tools.harness import serving
from mixtral.config import preset

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member", "tier"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "member": {"type": "boolean"},
                         "tier": {"enum": ["gold", "silver", "bronze"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def v3(make_ckpt):
    backend = LocalBackend.from_checkpoint(make_ckpt(preset("tiny-v3")), model_name="tiny-v3")
    with serving(build_openai_app(backend)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), backend


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


@pytest.mark.parametrize("seed", [1, 2])
def test_chat_json_schema_validates(v3, seed):
    client, _ = v3
    out = client.chat.completions.create(model="tiny-v3", messages=MSGS, response_format=person_format(),
                                         max_tokens=120, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"          # the grammar completed, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_chat_json_schema_streams(v3):
    client, _ = v3
    chunks = list(client.chat.completions.create(model="tiny-v3", messages=MSGS, response_format=person_format(),
                                                 max_tokens=120, seed=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_json_schema_whole_and_streamed(v3):
    client, _ = v3
    fmt = person_format(strict=False)
    out = client.completions.create(model="tiny-v3", prompt="A person:", max_tokens=120, seed=4,
                                    extra_body={"response_format": fmt})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)
    chunks = list(client.completions.create(model="tiny-v3", prompt="A person:", max_tokens=120, seed=4,
                                            stream=True, extra_body={"response_format": fmt}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text   # same seed


def test_json_object_is_an_object(v3):
    """Any object: keys are free strings, which a random model sampling at temperature 1 would
    rarely close, so it is run greedy (deterministic; this checkpoint closes the object)."""
    client, _ = v3
    for stream in (False, True):
        kw = dict(model="tiny-v3", messages=MSGS, response_format={"type": "json_object"}, max_tokens=60,
                  temperature=0)
        if stream:
            chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            out = client.chat.completions.create(**kw)
            text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert finish == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_parses_into_the_function(v3, choice, stream):
    client, _ = v3
    kw = dict(model="tiny-v3", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, CLOCK],
              tool_choice=choice, max_tokens=120, seed=5)
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        finish = chunks[-1].choices[0].finish_reason
        calls = [c for ch in chunks for c in ch.choices[0].delta.tool_calls or []]
    else:
        out = client.chat.completions.create(**kw)
        finish, calls = out.choices[0].finish_reason, out.choices[0].message.tool_calls
    assert finish == "tool_calls" and calls
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for call in calls:
        if choice != "required":
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": 3}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "(("}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_bad_structured_requests_are_400_naming_the_field(v3, body, param):
    client, _ = v3
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-v3", messages=MSGS, max_tokens=4, extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    # and the server still serves
    ok = client.chat.completions.create(model="tiny-v3", messages=MSGS, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_mask_allows_exactly_the_grammar(make_ckpt):
    """The bitmask, unpacked by the sampler: control tokens never, the forced prefix alone, and
    after a complete object only end of sequence."""
    tok = Tokenizer.from_checkpoint(make_ckpt(preset("tiny-v3")))
    grammars = Grammars(tok)
    marker = tok.mistral.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
    m = grammars.matcher(GrammarSpec('{"type": "object"}', prefix_token_ids=[marker]))

    def allowed() -> set[int]:
        logits = torch.zeros(2, tok.vocab_size)
        fill_masks([m], [1], 2).apply_(logits)
        assert bool(torch.isfinite(logits[0]).all())          # rows without a grammar are untouched
        return set(torch.isfinite(logits[1]).nonzero().flatten().tolist())

    assert allowed() == {marker}
    assert not m.accept(marker)
    first = allowed()
    # An object's opening, or the one space SentencePiece may put before it.
    assert first and all(tok.decode([t]).strip().startswith("{") or tok.piece(t) in ("<0x20>", "\u2581")
                         for t in first)
    assert not first & set(range(tok.mistral.instruct_tokenizer.tokenizer.num_special_tokens))
    for t in tok.encode('{"a":1', bos=False):                # '▁{"' 'a' '":' '1'
        assert not m.accept(t) and m.error is None
    assert m.accept(tok.encode("1}", bos=False)[-1]) and m.error is None   # '}': complete, nothing may follow
    bad = grammars.matcher(GrammarSpec('{"type": "object"}'))
    assert bad.accept(tok.encode("x", bos=False)[-1]) and "does not allow" in bad.error


def test_compiled_grammars_are_cached(make_ckpt):
    grammars = Grammars(Tokenizer.from_checkpoint(make_ckpt(preset("tiny-v3"))))
    spec = GrammarSpec(json.dumps(PERSON))
    assert grammars.compile(spec) is grammars.compile(GrammarSpec(json.dumps(PERSON)))
    assert grammars.compile(spec) is not grammars.compile(GrammarSpec(json.dumps(PERSON), strict=False))
    with pytest.raises(RequestError) as e:
        grammars.compile(GrammarSpec('{"type": "bogus"}', param="tools"))
    assert e.value.param == "tools" and "bogus" in e.value.message


def test_grammar_rows_leave_the_others_alone(make_ckpt):
    """In one batch, constrained and free sequences: the free ones sample exactly what they
    sample alone (masks touch their own rows only), the constrained ones end in valid JSON."""
    engine, tok = build_engine(make_ckpt(preset("tiny-v3")))
    prompt = tok.encode("Hello there")
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    (alone,) = asyncio.run(engine.generate([prompt], free))

    async def mixed():
        seqs = [engine.add(prompt, free)] + [
            engine.add(prompt, SamplingParams(max_tokens=80, seed=s, grammar=GrammarSpec(json.dumps(PERSON))))
            for s in range(2)]
        while engine.has_work:
            await engine.step()
        return seqs

    plain, *constrained = asyncio.run(mixed())
    assert plain.output_ids == alone.output_ids
    for s in constrained:
        assert s.finish_reason == "stop"
        jsonschema.validate(json.loads(tok.decode(s.output_ids)), PERSON)


def test_grpc_json_schema(loop, tiny_ckpt):
    """The public gRPC door, with the v1 vocabulary: a schema'd answer, and a bad schema refused."""
    import grpc

    from cluster.api.grpc_api import start_grpc_server
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny")
    server, port = asyncio.run_coroutine_threadsafe(start_grpc_server(backend), loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            out = list(stub.Generate(pb.GenerateRequest(text="A person:", max_tokens=120, seed=6,
                                                        json_schema=json.dumps(PERSON)), timeout=60))
            assert out[-1].finish_reason == "stop"
            jsonschema.validate(json.loads("".join(r.text for r in out)), PERSON)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(text="hi", json_schema='{"type": "bogus"}'), timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in e.value.details()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
