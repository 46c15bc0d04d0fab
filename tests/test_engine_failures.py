"""A step that raises, on a real engine: the requests in that step fail with the error named,
the others (waiting, or arriving later) are served with their own tokens, and every block
comes back; over the Python API, OpenAI HTTP and the public gRPC door. (Expert groups with no
live replica and hung shards: tests/test_faults.py.)"""

from __future__ import annotations

import asyncio

import grpc
import openai
import pytest

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.api.backend import LocalBackend
from cluster.api.grpc_api import start_grpc_server
from cluster.api.openai_api import build_openai_app
from cluster.local import build_engine
from cluster.tools.harness import serving
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

PROMPTS = [[1] + list(range(700 + 9 * i, 705 + 11 * i)) for i in range(4)]
N = 12
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
# Three run at once; the fourth waits for a slot.
CFG = EngineConfig(max_num_seqs=3)


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt)
    return [s.output_ids for s in asyncio.run(engine.generate(PROMPTS, GREEDY))]


class FailingStep:
    """Wraps a runner's `run`: the `at`-th call raises, the others run."""

    def __init__(self, run, at: int):
        self.run, self.at, self.calls = run, at, 0
        self.failed_seqs: list[int] = []

    async def __call__(self, scheduled):
        self.calls += 1
        if self.calls == self.at:
            self.failed_seqs = [s.seq.seq_id for s in scheduled]
            raise RuntimeError("injected fault in the layer loop")
        return await self.run(scheduled)


def _backend(ckpt, at: int) -> tuple[LocalBackend, FailingStep]:
    engine, tok = build_engine(ckpt, CFG)
    fault = FailingStep(engine.runner.run, at)
    engine.runner.run = fault
    return LocalBackend(AsyncEngine(engine, tok), "tiny"), fault


def test_python_api_fails_the_step_and_serves_the_rest(tiny_ckpt, expected):
    engine, _ = build_engine(tiny_ckpt, CFG)
    fault = FailingStep(engine.runner.run, at=4)          # decoding: the first three are running
    engine.runner.run = fault
    seqs = asyncio.run(engine.generate(PROMPTS, GREEDY))
    failed = [s for s in seqs if s.finish_reason == "error"]
    assert [s.seq_id for s in failed] == fault.failed_seqs and len(failed) == 3
    assert all(s.error == "RuntimeError: injected fault in the layer loop" for s in failed)
    assert all(0 < s.num_output < N for s in failed)
    assert seqs[3].finish_reason == "length" and seqs[3].output_ids == expected[3]   # it was waiting
    assert engine.blocks_all_free
    (again,) = asyncio.run(engine.generate([PROMPTS[0]], GREEDY))
    assert again.output_ids == expected[0]


def test_http_streams_end_with_an_error_event_and_the_next_request_is_served(tiny_ckpt, expected):
    backend, fault = _backend(tiny_ckpt, at=3)
    with serving(build_openai_app(backend)) as url:
        async def run():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

            async def one(prompt):
                text, err = "", None
                try:
                    async for c in await client.completions.create(
                            model="tiny", prompt=prompt, max_tokens=N, temperature=0, stream=True,
                            extra_body={"ignore_eos": True}):
                        text += c.choices[0].text if c.choices else ""
                except openai.APIError as e:
                    err = e
                return text, err
            out = await asyncio.gather(*(one(p) for p in PROMPTS))
            in_streams = len(fault.failed_seqs)
            fault.calls, fault.at = 0, 1
            with pytest.raises(openai.InternalServerError) as whole:     # non-streaming: a 500 body
                await client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N, temperature=0)
            after = await client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=N, temperature=0,
                                                    extra_body={"ignore_eos": True})
            await client.close()
            return out, in_streams, whole.value, after
        out, in_streams, whole, after = asyncio.run(run())
    errors = [err for _, err in out if err is not None]
    assert len(errors) == in_streams >= 1
    assert all("injected fault in the layer loop" in str(e) for e in errors)
    assert "injected fault" in whole.message and whole.status_code == 500
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == N
    tok = backend.tokenizer
    served = [text for text, err in out if err is None]
    want = [tok.decode(p[-6:] + e)[len(tok.decode(p[-6:])):] for p, e in zip(PROMPTS, expected)]
    assert served and all(t in want for t in served)
    assert backend.engine.engine.blocks_all_free


def test_grpc_gets_internal_naming_the_fault_and_the_door_keeps_serving(tiny_ckpt, expected, loop):
    backend, fault = _backend(tiny_ckpt, at=2)
    server, port = asyncio.run_coroutine_threadsafe(start_grpc_server(backend), loop).result(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GenerationStub(channel)
    try:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[0]), max_tokens=N, temperature=0,
                                 ignore_eos=True)
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Generate(req, timeout=60))
        after = list(stub.Generate(req, timeout=60))
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: injected fault in the layer loop" in failed.value.details()
    assert [t for r in after for t in r.token_ids] == expected[0]
    assert backend.engine.engine.blocks_all_free
