"""The lm_head's greedy screen (mixtral/greedy.py, csrc/greedy_head.cpp): the argmax of every
fp32 logit, bit for bit, from a bf16 screen and an fp32 check of the outputs it leaves."""

import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from mixtral import greedy
from mixtral.greedy import greedy_tokens, pack_greedy
from mixtral.linear import Packed, linear, pack_linear

pytestmark = pytest.mark.skipif(not greedy._built(), reason="no AVX-512 BF16 on this CPU, or no compiler")

G = torch.Generator().manual_seed(0)
W = torch.randn(2048, 96, generator=G) * 0.05            # 128 panels: pairs, and odd counts below


def _head(w: torch.Tensor):
    p = pack_linear(w)
    assert isinstance(p, Packed)
    return p, pack_greedy(p)


def _argmax(x, p):
    return linear(x, p).argmax(-1)


@pytest.mark.parametrize("M", [1, 2, 6, 7, 12, 13, 25, 40])
def test_the_token_is_the_argmax_of_every_logit(M):
    p, h = _head(W)
    x = torch.randn(M, 96, generator=G) * 3
    assert torch.equal(greedy_tokens(x, h), _argmax(x, p))


def test_the_pack_is_the_bf16_weights_and_their_norms():
    p, h = _head(W[:48])
    v = W[:48].to(torch.bfloat16)
    assert torch.equal(h.screen.permute(0, 2, 1, 3).reshape(48, 96), v)
    q = h.q.permute(0, 2, 1).reshape(48, 96).double() * h.scale.double()[:, None]      # scale[v] * q[v]
    assert h.q.abs().max() == 127 and ((q - W[:48].double()).abs() <= h.scale.double()[:, None] / 2 * 1.001).all()
    assert h.panels is p.panels
    wd = W[:48].double()
    for bound, vd in ((h.bound, v.double()), (h.qbound, q)):
        expect = [wd.norm(dim=1).max(), vd.norm(dim=1).max(), (wd - vd).norm(dim=1).max()]
        torch.testing.assert_close(bound, torch.stack(expect))


# A few rows take the int8 screen, more the bf16 one (csrc/greedy_head.cpp Q8_ROWS).
SCREENS = pytest.mark.parametrize("rows", [1, 9], ids=["int8", "bf16"])


@SCREENS
def test_ties_and_near_ties_go_to_the_first_index(rows):
    """Rows equal to the winner, and rows a rounding away from it (the screen cannot tell them
    apart): all are checked in fp32 and the first of the equal maxima wins, as torch.argmax."""
    w = W.clone()
    best = w[1500] * 4
    w[1500] = best
    for n in (40, 41, 900):                       # exact copies, before the original
        w[n] = best
    for i, n in enumerate(range(1000, 1016)):     # within bf16's rounding of it
        w[n] = best * (1 + (i - 8) * 2e-6)
    p, h = _head(w)
    x = best[None].repeat(3 * rows, 1) * 10
    x[1::3] += torch.randn(rows, 96, generator=G) * 1e-3
    x[2::3] = -x[2::3]
    assert torch.equal(greedy_tokens(x, h), _argmax(x, p))
    assert greedy_tokens(x[:1], h).item() == _argmax(x[:1], p).item() in (1015, 1014, 1013)


@SCREENS
def test_a_screen_that_leaves_every_output_still_gives_the_argmax(rows):
    """All logits within the screen's bound of each other: every panel is checked in fp32."""
    w = torch.ones(512, 96) + torch.randn(512, 96, generator=G) * 1e-7
    p, h = _head(w)
    x = torch.ones(rows, 96) + torch.randn(rows, 96, generator=G) * 1e-3
    assert torch.equal(greedy_tokens(x, h), _argmax(x, p))


@SCREENS
def test_rows_that_are_not_finite_come_back_for_every_logit(rows):
    p, h = _head(W)
    x = torch.randn(rows + 3, 96, generator=G)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    t = greedy_tokens(x, h)
    assert t[1] == -1 and t[3] == -1
    keep = [0, 2] + list(range(4, rows + 3))
    assert torch.equal(t[keep], _argmax(x[keep], p))


def test_weights_it_cannot_screen_get_none():
    assert pack_greedy(W) is None                                        # not packed
    assert pack_greedy(pack_linear(torch.randn(32, 95, generator=G))) is None   # odd inputs
    bad = W[:32].clone()
    bad[3, 3] = float("inf")
    assert pack_greedy(pack_linear(bad)) is None


def test_the_engine_takes_the_screen_only_for_plain_greedy_steps(tiny_ckpt):
    """Same tokens with and without it; a step with logprobs or sampling takes every logit."""
    import asyncio

    on, _ = build_engine(tiny_ckpt, EngineConfig())
    off, _ = build_engine(tiny_ckpt, EngineConfig(greedy_screen=False))
    assert on.model.greedy_head is not None and off.model.greedy_head is None
    prompts = [[1] + list(range(5, 5 + n)) for n in (3, 40, 9)]

    def run(engine, params):
        with torch.profiler.profile() as prof:
            seqs = asyncio.run(engine.generate(prompts, params))
        calls = sum(e.name == "moe_serve_greedy::greedy_argmax" for e in prof.events())
        return [s.output_ids for s in seqs], calls

    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (a, calls_on), (b, calls_off) = run(on, plain), run(off, plain)
    assert a == b and calls_on == 12 and calls_off == 0
    scored = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    c, calls = run(on, scored)
    assert c == a and calls == 0


def test_the_models_greedy_is_its_logits_argmax_rows_that_fall_back_included(tiny_ckpt):
    """AttentionModel.greedy: the screen's tokens, and every logit for the rows it gives back."""
    engine, _ = build_engine(tiny_ckpt, EngineConfig())
    m = engine.model
    x = torch.randn(9, m.cfg.hidden_size, generator=G)
    x[4, 0] = float("nan")                                   # a NaN row: argmax is the NaN's, as torch's
    for rows in (x[:3], x[:1], x):                           # int8 screen, one row, bf16 screen
        assert torch.equal(m.greedy(rows), m.logits(rows).argmax(-1))
