"""The public Generation service on a grpc.aio server, called through a real client stub."""

from __future__ import annotations

import asyncio
import pickle
import time

import grpc
import pytest

from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.api.backend import LocalBackend
from cluster.api.grpc_api import RpcError, start_grpc_server
from cluster.local import build_engine
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

CONTEXT = 64      # a short context, so "unset max_tokens runs to the end of it" is quick to check


def _serve(loop, backend):
    server, port = asyncio.run_coroutine_threadsafe(start_grpc_server(backend), loop).result(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.GenerationStub(channel), backend
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)


@pytest.fixture(scope="module")
def served(loop, tiny_ckpt):
    cfg = EngineConfig(max_model_len=CONTEXT)
    yield from _serve(loop, LocalBackend.from_checkpoint(tiny_ckpt, cfg, model_name="tiny"))


@pytest.fixture(scope="module")
def long_context(loop, tiny_ckpt):
    yield from _serve(loop, LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny"))


def reference(ckpt, prompt_ids: list[int], n: int) -> list[int]:
    engine, _ = build_engine(ckpt)
    (seq,) = asyncio.run(engine.generate([prompt_ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    return seq.output_ids


def collect(stub, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))


@pytest.mark.parametrize("as_ids", [False, True])
def test_greedy_stream_equals_the_in_process_engine(served, tiny_ckpt, as_ids):
    stub, backend = served
    ids = backend.tokenizer.encode("The capital of France is")
    prompt = {"token_ids": pb.TokenIds(ids=ids)} if as_ids else {"text": "The capital of France is"}
    out = collect(stub, **prompt, max_tokens=10, temperature=0, ignore_eos=True, request_id="r-1")
    got = [t for r in out for t in r.token_ids]
    assert got == reference(tiny_ckpt, ids, 10)
    ctx = ids[-6:]
    tok = backend.tokenizer
    assert "".join(r.text for r in out) == tok.decode(ctx + got)[len(tok.decode(ctx)):]
    assert all(r.request_id == "r-1" for r in out) and len(out) > 1
    assert [r.finish_reason for r in out] == [""] * (len(out) - 1) + ["length"]
    assert (out[-1].usage.prompt_tokens, out[-1].usage.completion_tokens) == (len(ids), 10)


def test_logprobs_and_defaults(served):
    stub, backend = served
    out = collect(stub, text="Hello", max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    lps = [lp for r in out for lp in r.logprobs]
    assert len(lps) == 3 and all(len(lp.top_token_ids) == len(lp.top_logprobs) == 2 for lp in lps)
    # Greedy: the sampled token is the most likely one.
    assert [lp.top_token_ids[0] for lp in lps] == [t for r in out for t in r.token_ids]
    assert out[0].request_id.startswith("gen-")
    # Unset max_tokens: until the context is full (prompt + output - 1 positions).
    prompt = backend.tokenizer.encode("Hello")
    out = collect(stub, text="Hello", ignore_eos=True)
    assert out[-1].finish_reason == "length"
    assert out[-1].usage.completion_tokens == CONTEXT - len(prompt) + 1
    # Empty model name means the served one; unset temperature samples (seeded: repeatable).
    a = collect(stub, model="", text="Hello", max_tokens=6, seed=7, ignore_eos=True)
    b = collect(stub, model="tiny", text="Hello", max_tokens=6, seed=7, ignore_eos=True)
    assert [t for r in a for t in r.token_ids] == [t for r in b for t in r.token_ids]


def test_choices_and_sampling_controls(served):
    """n choices interleave, told apart by index; logit_bias and the penalties reach the sampler."""
    stub, backend = served
    out = collect(stub, text="Hello", max_tokens=5, temperature=0.9, seed=11, n=3, ignore_eos=True, logprobs=1,
                  presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.01)
    per = {i: [t for r in out if r.index == i for t in r.token_ids] for i in range(3)}
    assert all(len(v) == 5 for v in per.values()) and len({tuple(v) for v in per.values()}) == 3
    assert sorted(r.index for r in out if r.finish_reason) == [0, 1, 2]
    assert all(len(r.logprobs) == len(r.token_ids) for r in out)
    one = collect(stub, text="Hello", max_tokens=5, temperature=0.9, seed=11, ignore_eos=True, presence_penalty=0.5,
                  frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.01)
    assert [t for r in one for t in r.token_ids] == per[0]         # choice 0 is the n = 1 request
    forced = collect(stub, text="Hello", max_tokens=4, temperature=0, ignore_eos=True, logit_bias={1234: 100.0})
    assert [t for r in forced for t in r.token_ids] == [1234] * 4


def test_best_of_returns_the_best_candidate(served):
    """best_of = 3, n = 1: the one of the three n = 3 choices with the highest mean logprob,
    once, with the other candidates' tokens counted."""
    stub, _ = served
    kw = dict(text="Hello", max_tokens=5, temperature=1.0, seed=5, ignore_eos=True)
    three = collect(stub, n=3, logprobs=0, **kw)
    mean = {i: sum(lp.logprob for r in three if r.index == i for lp in r.logprobs) / 5 for i in range(3)}
    best = max(range(3), key=lambda i: (mean[i], -i))
    (one,) = collect(stub, best_of=3, **kw)
    assert one.index == 0 and one.finish_reason == "length"
    assert list(one.token_ids) == [t for r in three if r.index == best for t in r.token_ids]
    assert one.usage.completion_tokens == 5 and one.usage.unreturned_tokens == 10


@pytest.mark.parametrize("fields,code,words", [
    ({"model": "gpt-4", "text": "hi"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "no prompt"),
    ({"token_ids": pb.TokenIds(ids=[])}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"token_ids": pb.TokenIds(ids=[1, 32000])}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ({"text": "hi", "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"text": "hi", "max_tokens": CONTEXT}, grpc.StatusCode.INVALID_ARGUMENT, f"context is {CONTEXT}"),
    ({"text": "hi", "temperature": -1}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"text": "hi", "top_p": 0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"text": "hi", "temperature": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    ({"text": "hi", "logprobs": 99}, grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ({"text": "hi", "stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ({"text": "hi", "n": 0}, grpc.StatusCode.INVALID_ARGUMENT, "n must be"),
    ({"text": "hi", "n": 99}, grpc.StatusCode.INVALID_ARGUMENT, "n may be 16"),
    ({"text": "hi", "n": 3, "best_of": 2}, grpc.StatusCode.INVALID_ARGUMENT, "best_of must be at least n"),
    ({"text": "hi", "best_of": 17}, grpc.StatusCode.INVALID_ARGUMENT, "best_of may be 16"),
    ({"text": "hi", "presence_penalty": 3}, grpc.StatusCode.INVALID_ARGUMENT, "presence_penalty"),
    ({"text": "hi", "repetition_penalty": 0}, grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    ({"text": "hi", "logit_bias": {40000: 1.0}}, grpc.StatusCode.INVALID_ARGUMENT, "logit_bias token id"),
])
def test_bad_input_is_refused_and_the_server_keeps_serving(served, fields, code, words):
    stub, _ = served
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, **fields)
    assert e.value.code() == code and words in e.value.details()
    assert collect(stub, text="still here?", max_tokens=2)[-1].usage.completion_tokens == 2


def test_refusals_survive_pickling():
    """Ray Serve ships a deployment's exceptions between processes."""
    e = pickle.loads(pickle.dumps(RpcError(grpc.StatusCode.NOT_FOUND, "no such model")))
    assert (e.code, e.message, str(e)) == (grpc.StatusCode.NOT_FOUND, "no such model", "no such model")


def test_cancelling_the_call_stops_the_generation(long_context):
    stub, backend = long_context
    call = stub.Generate(pb.GenerateRequest(text="Go on", max_tokens=60000, ignore_eos=True), timeout=60)
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    ae = backend.engine
    while ae.num_running or ae.num_waiting or ae.engine.blocks.num_free != ae.engine.blocks.num_blocks:
        assert time.monotonic() < deadline, "the request kept running after its call was cancelled"
        time.sleep(0.02)
