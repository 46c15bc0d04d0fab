"""n > 1: the choices share the prompt's KV blocks, and each is what a request of its own gives."""

import asyncio

import msgspec

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from attention_service.sequence import choice_seed
from cluster.local import build_engine

PROMPT = [1] + list(range(500, 570))          # 71 tokens: 4 full blocks of 16 and a partial one


def _counting(engine) -> list:
    """Record how many tokens each scheduled sequence computes, step by step."""
    log, schedule = [], engine.scheduler.schedule

    def wrapped():
        out = schedule()
        log.append([(s.seq.index, s.num_tokens, list(s.seq.block_table)) for s in out])
        return out
    engine.scheduler.schedule = wrapped
    return log


def test_choices_fork_the_prompt_blocks_instead_of_prefilling_again(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt, EngineConfig(block_size=16, prefix_caching=False))
    log = _counting(engine)
    p = SamplingParams(max_tokens=4, temperature=0.9, seed=7, n=3, ignore_eos=True)
    seqs = asyncio.run(engine.generate([PROMPT], p))
    assert [s.index for s in seqs] == [0, 1, 2] and all(s.num_output == 4 for s in seqs)
    # The prompt is computed once; each other choice computes only the last partial block.
    assert log[0] == [(0, 71, log[0][0][2])]
    shared = log[0][0][2][:4]
    tails = [(i, n) for step in log[1:] for i, n, table in step if n > 1]
    assert sorted(tails) == [(1, 71 - 64), (2, 71 - 64)]
    assert all(table[:4] == shared for step in log[1:] for i, n, table in step if i)
    assert sum(n for step in log for _, n, _ in step) == 71 + 2 * 7 + 3 * 3
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_each_seeded_choice_is_its_own_request_whatever_the_batch(tiny_ckpt):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=42, n=3, ignore_eos=True)
    engine, _ = build_engine(tiny_ckpt, EngineConfig(block_size=8, max_batched_tokens=32))
    for other in ([1, 5, 6, 7], [1] + list(range(900, 960))):      # company in the same steps
        engine.add(other, SamplingParams(max_tokens=12, temperature=1.0))
    choices = engine.add(PROMPT, p).choices
    while engine.has_work:
        asyncio.run(engine.step())
    alone = []
    for i in range(3):
        one = msgspec.structs.replace(p, n=1, seed=choice_seed(42, i))
        alone.append(asyncio.run(build_engine(tiny_ckpt)[0].generate([PROMPT], one))[0].output_ids)
    assert [c.output_ids for c in choices] == alone
    assert len({tuple(a) for a in alone}) == 3                     # the seeds differ, so do the choices
    assert choice_seed(42, 0) == 42


def test_stream_marks_choices_and_ends_after_all(tiny_ckpt):
    engine, tok = build_engine(tiny_ckpt)

    async def run():
        aeng = AsyncEngine(engine, tok)
        p = SamplingParams(max_tokens=6, temperature=0, n=2, ignore_eos=True, logprobs=1)
        got = {0: [], 1: []}
        finished = []
        async for d in aeng.generate(PROMPT, p):
            got[d.index] += d.token_ids
            assert len(d.logprobs) == len(d.token_ids)
            if d.finish_reason:
                finished.append((d.index, d.finish_reason, d.completion_tokens))
        # Cancelled part way: every choice's blocks come back.
        stream = aeng.generate(PROMPT, msgspec.structs.replace(p, max_tokens=50, n=3))
        await anext(stream)
        await stream.aclose()
        await aeng.close()
        return got, finished

    got, finished = asyncio.run(run())
    (single,) = asyncio.run(build_engine(tiny_ckpt)[0].generate([PROMPT], SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True)))
    assert got[0] == got[1] == single.output_ids                  # greedy choices are alike
    assert sorted(finished) == [(0, "length", 6), (1, "length", 6)]
    assert engine.blocks.num_free == engine.blocks.num_blocks
