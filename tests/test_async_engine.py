"""The engine's request API: concurrent streams, stop strings, logprobs, cancellation, 64K context."""

import asyncio

import pytest
import torch

from attention_service.async_engine import AsyncEngine, _stop_scan
from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from mixtral.config import ModelConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _serve(ckpt, **cfg) -> AsyncEngine:
    engine, tok = build_engine(ckpt, EngineConfig(**cfg))
    return AsyncEngine(engine, tok)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 200, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, 32000, (k,), generator=g).tolist() for k in lens]


def test_twenty_concurrent_streams_each_get_their_single_run_tokens(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    prompts = _prompts(20)

    async def run():
        ae = _serve(tiny_ckpt, max_batched_tokens=256)      # prompts arrive in chunks beside decodes

        async def one(p, delay):
            await asyncio.sleep(delay)                       # join while others are mid-flight
            ids, texts = [], []
            async for d in ae.generate(p, GREEDY):
                ids += d.token_ids
                texts.append(d.text)
            return ids, "".join(texts), d
        out = await asyncio.gather(*(one(p, 0.005 * i) for i, p in enumerate(prompts)))
        await ae.close()
        return out, ae

    out, ae = asyncio.run(run())
    engine, tok = build_engine(tiny_ckpt)
    hf = transformers.MixtralForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    for p, (ids, text, last) in zip(prompts, out):
        (single,) = asyncio.run(engine.generate([p], GREEDY))
        assert ids == single.output_ids
        # the stream is the prompt's continuation: a first token "▁word" keeps its space
        ctx = p[-6:]
        assert text == tok.decode(ctx + ids)[len(tok.decode(ctx)):]
        assert last.finish_reason == "length" and last.completion_tokens == 12 and last.prompt_tokens == len(p)
    for p, (ids, _, _) in list(zip(prompts, out))[::4]:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert ids == ref
    assert ae.engine.blocks.num_free == ae.engine.blocks.num_blocks


def test_stop_strings_end_the_text_before_them(tiny_ckpt):
    async def run():
        ae = _serve(tiny_ckpt)
        free = await ae.complete([1, 851, 349, 264], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
        cut = free.text.index(stop)
        stopped = await ae.complete([1, 851, 349, 264], SamplingParams(max_tokens=24, temperature=0,
                                                                       ignore_eos=True, stop=[stop, "never!"]))
        await ae.close()
        return free, stop, cut, stopped

    free, stop, cut, stopped = asyncio.run(run())
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 24


@pytest.mark.parametrize("text,stops,expected", [
    ("hello wor", ["world"], (None, 3)), ("hello world!", ["world"], (6, 0)), ("abc", [], (None, 0)),
    ("ab", ["xab", "b!"], (None, 1)), ("xa", ["ab"], (None, 1)), ("a stop b STOP", ["STOP", "stop"], (2, 0))])
def test_stop_scan(text, stops, expected):
    assert _stop_scan(text, stops) == expected


def test_a_slow_reader_gets_the_steps_it_missed_as_one_delta(tiny_ckpt):
    """Deltas queued while the reader was away are merged: same tokens, text and logprobs."""
    prompt = [1, 415, 2936, 9060, 285]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True)

    async def run():
        ae = _serve(tiny_ckpt)
        fast = [d async for d in ae.generate(prompt, params)]
        slow = []
        async for d in ae.generate(prompt, params):
            slow.append(d)
            while ae.engine.scheduler.has_work and len(slow) == 1:   # let the engine run ahead
                await asyncio.sleep(0.01)
        await ae.close()
        return fast, slow

    fast, slow = asyncio.run(run())
    assert len(fast) == 10 and len(slow) < len(fast)
    assert sum(len(d.token_ids) for d in slow) == 10 and any(len(d.token_ids) > 1 for d in slow)
    for field in ("token_ids", "logprobs"):
        assert [x for d in slow for x in getattr(d, field)] == [x for d in fast for x in getattr(d, field)]
    assert "".join(d.text for d in slow) == "".join(d.text for d in fast)
    assert slow[-1].finish_reason == "length" and slow[-1].completion_tokens == 10
    assert all(d.finish_reason is None for d in slow[:-1])


def test_logprobs_are_the_models_own(tiny_ckpt):
    prompt = [1, 415, 2936, 9060, 285]

    async def run():
        ae = _serve(tiny_ckpt)
        d = await ae.complete(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=4,
                                                     ignore_eos=True))
        logits = await ae.engine.prompt_logits([prompt + d.token_ids])
        await ae.close()
        return d, logits[0]

    d, logits = asyncio.run(run())
    logp = torch.log_softmax(logits, -1)
    assert len(d.logprobs) == 6
    for i, (tok, (chosen, top)) in enumerate(zip(d.token_ids, d.logprobs)):
        row = logp[len(prompt) - 1 + i]
        assert chosen == pytest.approx(float(row[tok]), abs=1e-4)
        assert [t for t, _ in top] == row.topk(4).indices.tolist()


def test_cancel_frees_blocks_at_once_and_the_engine_keeps_serving(tiny_ckpt):
    async def run():
        ae = _serve(tiny_ckpt)
        stream = ae.generate([1] + list(range(100, 180)),
                             SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        got = [await stream.__anext__() for _ in range(3)]
        assert ae.engine.blocks.num_free < ae.engine.blocks.num_blocks
        await stream.aclose()
        freed = ae.engine.blocks.num_free == ae.engine.blocks.num_blocks
        after = await ae.complete([1, 5, 6, 7], GREEDY)
        await ae.close()
        return got, freed, after

    got, freed, after = asyncio.run(run())
    assert all(d.finish_reason is None for d in got)
    assert freed
    assert after.finish_reason == "length" and len(after.token_ids) == 12


# One layer, one head: a 64K causal prefill is ~2e9 softmax terms per head and layer on CPU.
LONG = ModelConfig(vocab_size=32000, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=1, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                   max_position_embeddings=65536, rope_theta=1e6)


def test_full_64k_context_runs_and_one_more_token_is_refused(make_ckpt):
    """65,536 prompt tokens (the model's max_position_embeddings) on CPU, fed in chunks."""
    ckpt = make_ckpt(LONG)

    async def run():
        ae = _serve(ckpt, max_batched_tokens=8192, kv_cache_bytes=64 * 2**20)
        g = torch.Generator().manual_seed(0)
        prompt = [1] + torch.randint(3, 32000, (65535,), generator=g).tolist()
        with pytest.raises(ValueError, match="the model's context is 65536"):
            async for _ in ae.generate(prompt + [5], SamplingParams(max_tokens=1)):
                pass
        assert not ae.engine.scheduler.has_work and ae.engine.blocks.num_free == ae.engine.blocks.num_blocks
        # a short request alongside the long one keeps streaming while the long one is fed in
        short = asyncio.create_task(ae.complete([1, 2, 3],
                                                SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
        d = await ae.complete(prompt, SamplingParams(max_tokens=1, temperature=0))
        s = await short
        await ae.close()
        return d, s

    d, s = asyncio.run(run())
    assert len(d.token_ids) == 1 and d.finish_reason in ("length", "stop") and d.prompt_tokens == 65536
    assert len(s.token_ids) == 4
