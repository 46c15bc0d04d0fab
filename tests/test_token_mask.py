"""TokenMask.apply_ (the words path on CPU, xgrammar's kernel elsewhere) gives exactly what
xgrammar's own kernel gives, bit for bit, and masks only the rows with a grammar."""

import pytest
import torch
import xgrammar as xgr

from attention_service.token_mask import TokenMask


def _case(vocab: int, width: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """A bitmask of 6 rows, 4 of them with a grammar, and logits [6, width]."""
    g = torch.Generator().manual_seed(vocab)
    B, rows = 6, [0, 2, 3, 5]
    bits = torch.randint(-2**31, 2**31 - 1, (B, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    bits[0] = 0                                  # nothing allowed
    bits[2, ::2] = 0                             # whole words off, mixed words between
    bits[5] = -1                                 # everything allowed
    bitmask = xgr.allocate_token_bitmask(B, vocab)
    bitmask[rows] = bits[rows]
    logits = torch.randn(B, width, generator=g) * 4
    logits[:, :2] = torch.tensor([-0.0, 0.0])   # signed zeros, where allowed, kept as they were
    return bitmask, rows, logits


@pytest.mark.parametrize("vocab, width", [(32000, 32000), (131072, 131072), (101, 101), (70, 80), (31, 40)])
def test_apply_matches_xgrammars_kernel(vocab, width):
    bitmask, rows, logits = _case(vocab, width)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab, indices=rows)
    want[rows, vocab:] = float("-inf")           # past the grammar's vocabulary: never allowed

    for mask in (TokenMask.unpack(bitmask, rows, vocab), TokenMask(bitmask, rows, vocab)):
        got = logits.clone()
        mask.apply_(got)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(got[[1, 4]], logits[[1, 4]])          # rows without a grammar: untouched
    assert bool(torch.isinf(got[0]).all()) and bool(torch.isfinite(got[5, :vocab]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("vocab, width", [(32000, 32000), (70, 80)])
def test_cuda_logits_get_what_cpu_logits_get(vocab, width):
    bitmask, rows, logits = _case(vocab, width)
    want = logits.clone()
    TokenMask.unpack(bitmask, rows, vocab).apply_(want)
    got = logits.cuda()
    TokenMask(bitmask, rows, vocab).apply_(got)
    assert torch.equal(got.cpu(), want)
