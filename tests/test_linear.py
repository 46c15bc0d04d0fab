"""The shared matmul (mixtral/linear.py): oneDNN on packed fp32 weights, row counts padded."""

import pytest
import torch
import torch.nn.functional as F

from mixtral import linear as linear_mod
from mixtral.linear import linear, pack_linear

W = torch.randn(384, 256, generator=torch.Generator().manual_seed(0))
X = torch.randn(700, 256, generator=torch.Generator().manual_seed(1))
PACKED = pack_linear(W)
needs_onednn = pytest.mark.skipif(not PACKED.is_mkldnn, reason="no oneDNN in this torch build")


@pytest.mark.parametrize("M", [1, 7, 127, 128, 129, 333, 700])
def test_matches_torch(M):
    y = linear(X[:M], PACKED)
    assert y.shape == (M, 384) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(X[:M], W), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_a_row_does_not_depend_on_the_row_count():
    """Padded or not, a row's result is the same bits: the padding rows touch nothing else."""
    alone = linear(X[:3], PACKED)
    for M in (3, 100, 128, 129, 333, 700):
        assert torch.equal(linear(X[:M], PACKED)[:3], alone), M


@needs_onednn
def test_large_row_counts_are_padded_to_a_few_shapes():
    """oneDNN sees row counts rounded up from _PAD_FROM on (one kernel serves many counts)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        for M in (100, 129, 333, 336):
            linear(X[:M], PACKED)
    seen = [e.input_shapes[0][0] for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]
    step = linear_mod._PAD_TO
    assert seen == [100, -(-129 // step) * step, -(-333 // step) * step, 336]


def test_other_weights_go_to_torch():
    w = W.double()
    assert pack_linear(w) is w
    torch.testing.assert_close(linear(X[:5].double(), w), F.linear(X[:5].double(), w))
