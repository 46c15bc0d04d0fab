"""Sampling's edge values mean one thing everywhere: in the sampler (held to their definitions
over many seeded draws), the Python API, OpenAI HTTP and the public gRPC door.

    top_k  -1, 0, V, 10^9  no cut          top_k 1            the argmax
    top_p  1.0             no cut          top_p tiny         the argmax
    temperature 0, tiny    the argmax
"""

from __future__ import annotations

import asyncio

import grpc
import openai
import pytest
import torch

from attention_service.sampler import sample
from attention_service.sampling_params import SamplingParams
from cluster.api.backend import LocalBackend
from cluster.api.grpc_api import start_grpc_server
from cluster.api.openai_api import build_openai_app
from cluster.local import build_engine
from cluster.tools.harness import serving
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

V = 32000
PROMPT = [1, 415, 5565, 302, 4843, 349]
N = 8
SEED = 1234
# Each edge value, and the plain request it must equal token for token.
SAME_AS_UNCUT = [dict(top_k=-1), dict(top_k=V), dict(top_k=10**9), dict(top_p=1.0)]
SAME_AS_GREEDY = [dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-6), dict(temperature=0.0)]


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": N, "temperature": 1.0, "seed": SEED, "ignore_eos": True, **kw})


# --- the sampler, by its definitions -----------------------------------------------------------
def _draws(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """n seeded draws from one row of logits [V'] under SamplingParams(**kw)."""
    rows = logits.expand(n, -1).clone()
    return sample(rows, [SamplingParams(**kw)] * n, list(range(n)), [0] * n)


def test_edge_values_cut_as_defined_over_many_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 2
    probs = logits.softmax(-1)
    n = 4000
    uncut = torch.bincount(_draws(logits, n, top_k=0), minlength=50).double() / n
    assert (uncut - probs).abs().max() < 0.03                 # the whole softmax, nothing cut
    for kw in ({"top_k": -1}, {"top_k": 50}, {"top_k": 10**9}, {"top_p": 1.0}):
        assert torch.equal(_draws(logits, n, **kw), _draws(logits, n, top_k=0)), kw
    argmax = int(logits.argmax())
    for kw in ({"top_k": 1}, {"top_p": 1e-9}, {"temperature": 1e-6}, {"temperature": 0.0}):
        assert set(_draws(logits, 200, **kw).tolist()) == {argmax}, kw
    top3 = logits.topk(3).indices
    freq = torch.bincount(_draws(logits, n, top_k=3), minlength=50).double() / n
    assert set(freq.nonzero().flatten().tolist()) <= set(top3.tolist())
    renorm = probs[top3] / probs[top3].sum()
    assert (freq[top3] - renorm).abs().max() < 0.03           # the kept ones in their proportions


# --- the same values through every door ----------------------------------------------------------
@pytest.fixture(scope="module")
def python_api(tiny_ckpt):
    engine, tok = build_engine(tiny_ckpt)

    def run(**kw) -> list[int]:
        (seq,) = asyncio.run(engine.generate([PROMPT], _params(**kw)))
        return seq.output_ids
    return run, tok


@pytest.fixture(scope="module")
def http(tiny_ckpt):
    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny")
    with serving(build_openai_app(backend)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def run(**kw) -> str:
            kw = {"temperature": 1.0, **kw}
            extra = {"ignore_eos": True, **({"top_k": kw.pop("top_k")} if "top_k" in kw else {})}
            r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, seed=SEED, extra_body=extra, **kw)
            return r.choices[0].text
        yield run


@pytest.fixture(scope="module")
def grpc_door(tiny_ckpt, loop):
    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny")
    server, port = asyncio.run_coroutine_threadsafe(start_grpc_server(backend), loop).result(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GenerationStub(channel)

    def run(**kw) -> list[int]:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_tokens=N, seed=SEED, ignore_eos=True,
                                 **{"temperature": 1.0, **kw})
        return [t for r in stub.Generate(req, timeout=60) for t in r.token_ids]
    yield run
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)


@pytest.mark.parametrize("kw", SAME_AS_UNCUT + SAME_AS_GREEDY, ids=str)
def test_every_door_gives_the_value_its_one_meaning(python_api, http, grpc_door, kw):
    run, tok = python_api
    want = run(temperature=0.0) if kw in SAME_AS_GREEDY else run(top_k=0)
    assert run(**kw) == want
    assert grpc_door(**kw) == want
    text = tok.decode(PROMPT[-6:] + want)[len(tok.decode(PROMPT[-6:])):]
    assert http(**kw) == text


def test_the_uncut_and_greedy_runs_differ_so_the_comparisons_mean_something(python_api):
    run, _ = python_api
    assert run(top_k=0) != run(temperature=0.0)
