"""best_of: the candidates are what n = best_of gives, and the n returned are those with the
highest mean log-probability per token, computed here from the candidates' own logprobs."""

from __future__ import annotations

import asyncio

import msgspec
import openai
import pytest

from attention_service.async_engine import AsyncEngine
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer
from cluster.api.backend import LocalBackend, token_text
from cluster.api.openai_api import build_openai_app
from cluster.local import build_engine
from cluster.tools.harness import serving

PROMPT = [1, 415, 5565, 302, 4843, 349]
BASE = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)


async def _deltas(engine: AsyncEngine, params: SamplingParams) -> list:
    return [d async for d in engine.generate(PROMPT, params)]


def _rank(deltas: list) -> tuple[list[list[int]], list[int]]:
    """The candidates of an n = best_of request with logprobs, and their indices best first
    by mean logprob."""
    toks, lps = {}, {}
    for d in deltas:
        toks.setdefault(d.index, []).extend(d.token_ids)
        lps.setdefault(d.index, []).extend(lp for lp, _ in d.logprobs)
    mean = {i: sum(v) / len(v) for i, v in lps.items()}
    return [toks[i] for i in sorted(toks)], sorted(mean, key=lambda i: (-mean[i], i))


def _ranking(ckpt, seed: int, best_of: int) -> tuple[list[list[int]], list[int]]:
    engine, tok = build_engine(ckpt)
    params = msgspec.structs.replace(BASE, seed=seed, n=best_of, logprobs=0)
    return _rank(asyncio.run(_deltas(AsyncEngine(engine, tok), params)))


def test_best_of_returns_the_candidates_with_the_highest_mean_logprob(tiny_ckpt):
    engine, tok = build_engine(tiny_ckpt)
    aengine = AsyncEngine(engine, tok)

    async def run():
        # A seed whose best candidates are not the first ones, so picking by index would fail.
        for seed in range(10):
            candidates, order = _rank(await _deltas(aengine, msgspec.structs.replace(BASE, seed=seed, n=4, logprobs=0)))
            if order[:2] != [0, 1]:
                break
        else:
            pytest.fail("every seed ranked candidates 0 and 1 first")
        ranked = [await _deltas(aengine, msgspec.structs.replace(BASE, seed=seed, n=2, best_of=4, logprobs=lp))
                  for lp in (None, 2)]        # ranked without and with logprobs asked for
        return candidates, order, ranked

    candidates, order, ranked = asyncio.run(run())
    assert len({tuple(c) for c in candidates}) == 4
    for got, logprobs in zip(ranked, (None, 2)):
        assert [d.index for d in got] == [0, 1] and all(d.finish_reason == "length" for d in got)
        assert [d.token_ids for d in got] == [candidates[i] for i in order[:2]]
        assert got[0].unreturned_tokens == 2 * 6 and got[1].unreturned_tokens == 0
        assert (got[0].logprobs is None) == (logprobs is None)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_best_of_is_refused_where_it_cannot_hold():
    with pytest.raises(Exception) as e:
        SamplingParams(n=3, best_of=2)
    assert e.value.param == "best_of"
    assert not SamplingParams(n=2, best_of=2).ranked and SamplingParams(best_of=2).candidates == 2


@pytest.fixture(scope="module")
def http(tiny_ckpt):
    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name="tiny")
    with serving(build_openai_app(backend)) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_best_of_over_http_with_the_openai_client(http, tiny_ckpt):
    _, client = http
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    candidates, order = _ranking(tiny_ckpt, 3, 3)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, best_of=3,
                                    logprobs=0, extra_body={"ignore_eos": True})
    (choice,) = out.choices
    assert choice.index == 0
    assert choice.logprobs.tokens == [token_text(tok, t) for t in candidates[order[0]]]
    assert out.usage.completion_tokens == 3 * 6 and out.usage.prompt_tokens == len(PROMPT)
    # best_of = n is plain n, and streams
    streamed = list(client.completions.create(model="tiny", prompt="hi", max_tokens=2, n=2, best_of=2, stream=True))
    assert sorted(c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason) == [0, 1]
