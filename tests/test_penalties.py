"""Penalties, logit_bias and min_p: against transformers' own logits processors, or by hand where
it has none (OpenAI's presence and frequency penalties), and through the engine against
MixtralForCausalLM.generate."""

import asyncio

import pytest
import torch

from attention_service.sampler import penalize, sample
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

V = 40


def _rows(seed: int = 0) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 3
    history = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 9, 1, 12)]
    return logits, history, [3, 9, 1, 5]


def test_repetition_penalty_and_bias_are_transformers_processors():
    logits, history, plens = _rows()
    bias = {3: 2.5, 7: -4.0, history[0][0]: 1.5}
    params = [SamplingParams(repetition_penalty=1.7, logit_bias=bias), SamplingParams(),
              SamplingParams(repetition_penalty=0.6), SamplingParams(repetition_penalty=1.2)]
    ours = penalize(logits, params, history, plens)
    for i, p in enumerate(params):
        ids, ref = torch.tensor([history[i]]), logits[i:i + 1].clone()
        if p.logit_bias:                                  # transformers applies the bias first too
            ref = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias.items()})(ids, ref)
        if p.repetition_penalty != 1:
            ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, ref)
        torch.testing.assert_close(ours[i], ref[0], rtol=0, atol=1e-6)
    assert torch.equal(ours[1], logits[1])                # an unpenalised row is left alone


def test_presence_and_frequency_count_the_output_only():
    logits, history, plens = _rows(1)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)] * 3 + [SamplingParams(
        frequency_penalty=-1.0)]
    ours = penalize(logits, params, history, plens)
    for i, p in enumerate(params):
        ref = logits[i].clone()
        out = history[i][plens[i]:]
        for t in set(out):
            ref[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-6)
    assert torch.equal(ours[1], logits[1]) and torch.equal(ours[2], logits[2])   # outputs empty


def test_greedy_takes_the_argmax_of_the_penalised_logits():
    logits, history, plens = _rows(2)
    best = logits.argmax(-1)
    params = [SamplingParams(temperature=0, logit_bias={int((best[i] + 1) % V): 100.0}) for i in range(4)]
    out = sample(logits, params, [0] * 4, [0] * 4, history, plens)
    assert out.tolist() == [int((b + 1) % V) for b in best]
    with pytest.raises(ValueError, match="history"):
        sample(logits, params, [0] * 4, [0] * 4)


def test_min_p_keeps_what_transformers_keeps_and_draws_in_proportion():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, V, generator=g) * 2
    p = SamplingParams(temperature=0.8, min_p=0.2)
    warped = MinPLogitsWarper(min_p=0.2)(None, TemperatureLogitsWarper(0.8)(None, row.clone()))
    want = torch.softmax(warped, -1)[0]
    n = 6000
    draws = sample(row.expand(n, V).clone(), [p] * n, list(range(n)), [0] * n)
    freq = torch.bincount(draws, minlength=V).float() / n
    assert set(draws.tolist()) <= set(torch.nonzero(want).flatten().tolist())
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                                 dict(repetition_penalty=0), dict(min_p=1.5), dict(logit_bias={5: 101.0}),
                                 dict(n=0)])
def test_bad_values_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_engine_matches_transformers_generate_with_penalties(tiny_ckpt):
    """Greedy with a repetition penalty and a bias, prompt counted: MixtralForCausalLM.generate."""
    hf = transformers.MixtralForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    engine, _ = build_engine(tiny_ckpt)
    prompts = [[1, 415, 415, 302, 4843, 349, 415], [1] + list(range(700, 740))]
    plain = asyncio.run(engine.generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    bias = {13: 3.0, 415: -2.0, plain[0].output_ids[3]: -5.0}
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5, logit_bias=bias)
    seqs = asyncio.run(engine.generate(prompts, params))     # one batch, both penalised
    for p, seq in zip(prompts, seqs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                              sequence_bias={(t,): b for t, b in bias.items()})
        assert seq.output_ids == ref[0, len(p):].tolist()
    assert plain[0].output_ids != seqs[0].output_ids                  # the penalty did change something
