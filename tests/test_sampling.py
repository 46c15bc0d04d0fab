"""Sampling: greedy, temperature, top-k, top-p, seeds; and that batching never changes a request."""

import asyncio

import msgspec
import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.sampler import _TOP_P_CANDIDATES, _candidates, sample
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    out = sample(logits, [SamplingParams(temperature=0)] * 4, [0] * 4, [0] * 4)
    assert torch.equal(out, logits.argmax(-1))


def _kept(logits, top_k, top_p):
    """The cut distribution over the whole vocabulary, as _candidates leaves it: [R, V]."""
    kept, ids = _candidates(torch.softmax(logits, -1), torch.tensor(top_k), torch.tensor(top_p))
    return torch.zeros_like(logits).scatter_(-1, ids, kept)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = _kept(logits, [2], [1.0])
    assert (probs[0, 2:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0))
    probs = _kept(logits, [0], [0.7])                        # 0.5 + 0.3 reaches 0.7
    assert probs[0].nonzero().flatten().tolist() == [0, 1]
    probs = _kept(logits, [0], [0.01])                       # the top token always stays
    assert probs[0].nonzero().flatten().tolist() == [0]
    # top-p on the top-k renormalised: (0.5 + 0.3) / 0.95 = 0.84 reaches 0.82 (0.8 would not)
    probs = _kept(logits, [3], [0.82])
    assert probs[0].nonzero().flatten().tolist() == [0, 1]


def test_a_flat_row_cuts_past_the_candidates():
    """A top-p cut beyond the first _TOP_P_CANDIDATES tokens is still exact."""
    V = 4 * _TOP_P_CANDIDATES
    logits = torch.zeros(2, V)
    logits[1, :10] = 20.0                                    # row 1 is peaked, row 0 flat
    probs = _kept(logits, [0, 0], [0.5, 0.45])
    assert int((probs[0] > 0).sum()) == V // 2 and int((probs[1] > 0).sum()) == 5


def test_cut_draws_stay_inside_the_cut_and_follow_it():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))[None].expand(6000, 5)
    p = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)  # top-4 renormalised: .417 .313 .208 .063 -> keep 3
    draws = sample(logits.clone(), [p] * 6000, list(range(6000)), [0] * 6000)
    freq = torch.bincount(draws, minlength=5).float() / 6000
    torch.testing.assert_close(freq, torch.tensor([4, 3, 2, 0, 0]) / 9, atol=0.03, rtol=0)
    assert freq[3] == 0 and freq[4] == 0


def test_draws_follow_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))[None].expand(4000, 3)
    p = SamplingParams(temperature=1.0)
    draws = sample(logits.clone(), [p] * 4000, list(range(4000)), [0] * 4000)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)
    again = sample(logits.clone(), [p] * 4000, list(range(4000)), [0] * 4000)
    assert torch.equal(draws, again)
    other_step = sample(logits.clone(), [p] * 4000, list(range(4000)), [1] * 4000)
    assert not torch.equal(draws, other_step)


def test_low_temperature_approaches_greedy():
    """At T = 1e-4 a logit 0.05 below the best is e^-500 as likely: the argmax every time. (Left
    to chance, two random logits 1e-4 apart would make the runner-up a fair draw, as it should.)"""
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(64), logits.argmax(-1)] += 0.05
    out = sample(logits, [SamplingParams(temperature=1e-4)] * 64, list(range(64)), [0] * 64)
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(logprobs=99), dict(stop=[""]),
                                 dict(temperature=float("nan")), dict(top_p=float("inf"))])
def test_bad_params_are_refused_with_the_field_named(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_seeded_request_gives_the_same_tokens_alone_or_in_a_crowd(tiny_ckpt):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = [1, 415, 5565, 302, 4843, 349]
    engine, _ = build_engine(tiny_ckpt)
    (alone,) = asyncio.run(engine.generate([prompt], p))
    # In a crowd, with a token budget so small that the cache and chunking differ too.
    engine, _ = build_engine(tiny_ckpt, EngineConfig(max_batched_tokens=7, block_size=4))
    others = [[1] + list(range(200, 200 + n)) for n in (3, 30, 9)]
    for o in others:
        engine.add(o, SamplingParams(max_tokens=20, temperature=1.0))
    crowded = engine.add(prompt, p)
    (other_seed,) = asyncio.run(engine.generate([prompt], msgspec.structs.replace(p, seed=99)))
    assert crowded.output_ids == alone.output_ids
    assert other_seed.output_ids != alone.output_ids


def test_batch_gives_each_prompt_its_single_run_tokens(tiny_ckpt):
    prompts = [[1] + list(range(300, 300 + n)) for n in (1, 7, 40, 120, 5)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine, _ = build_engine(tiny_ckpt)
    batch = asyncio.run(engine.generate(prompts, greedy))
    for p, seq in zip(prompts, batch):
        (single,) = asyncio.run(engine.generate([p], greedy))
        assert seq.output_ids == single.output_ids
        assert seq.num_output == 12 and seq.finish_reason == "length"


def test_eos_and_stop_token_ids_finish_a_request(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt)
    (free,) = asyncio.run(engine.generate([[1, 22, 33]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    third = free.output_ids[2]
    (stopped,) = asyncio.run(engine.generate([[1, 22, 33]], SamplingParams(max_tokens=8, temperature=0,
                                                                           stop_token_ids=[third])))
    assert stopped.output_ids == free.output_ids[:3] and stopped.finish_reason == "stop"


def test_engine_refuses_what_cannot_run(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="needs 68 positions; the model's context is 64 tokens"):
        engine.add(list(range(1, 60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([1, 32000], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add([], SamplingParams())


@pytest.mark.parametrize("off", [-1, 0, 32000, 2**63, 10**30])
def test_top_k_off_and_beyond_the_vocabulary_sample_the_whole_softmax(off):
    logits = torch.randn(3, 32000)
    p = SamplingParams(temperature=0.7, top_k=off)
    assert torch.equal(sample(logits.clone(), [p] * 3, [5, 6, 7], [0] * 3),
                       sample(logits.clone(), [SamplingParams(temperature=0.7)] * 3, [5, 6, 7], [0] * 3))


def test_a_tiny_temperature_is_the_argmax_not_nan():
    logits = torch.randn(8, 1000) * 30
    out = sample(logits, [SamplingParams(temperature=1e-30, top_p=0.5)] * 8, list(range(8)), [0] * 8)
    assert torch.equal(out, logits.argmax(-1))


def test_a_request_whose_sampling_raises_fails_alone(tiny_ckpt):
    """Parameters the checks let through but the sampler cannot take end that request with an
    error; the others in its steps go on to their single-run tokens and every block comes back."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True, logprobs=2)
    poison = SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True)
    msgspec.structs.force_setattr(poison, "temperature", "hot")    # past the checks: the sampler raises on it
    engine, _ = build_engine(tiny_ckpt)
    prompts = [[1, 300, 301], [1, 400, 401, 402], [1, 500]]
    alone = [asyncio.run(engine.generate([p], q))[0] for p, q in zip(prompts[:2], (greedy, seeded))]
    good = [engine.add(prompts[0], greedy), engine.add(prompts[1], seeded)]
    bad = engine.add(prompts[2], poison)
    while engine.scheduler.has_work:
        asyncio.run(engine.step())
    assert bad.finish_reason == "error" and "sampling failed" in bad.error
    for seq, ref in zip(good, alone):
        assert seq.finish_reason == "length" and seq.output_ids == ref.output_ids
    def ids(lps):
        return [[i for i, _ in alts] for _, alts in lps]
    assert ids(good[1].logprobs) == ids(alone[1].logprobs)
    assert [lp for lp, _ in good[1].logprobs] == pytest.approx([lp for lp, _ in alone[1].logprobs], abs=1e-4)
    assert engine.blocks.num_free == engine.blocks.num_blocks
