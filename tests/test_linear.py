"""The shared matmul (mixtral/linear.py): oneDNN on packed fp32 weights, row counts padded;
the panel kernel (mixtral/csrc/panel_linear.cpp) for a few rows."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mixtral import linear as linear_mod
from mixtral.linear import SMALL_ROWS, Packed, linear, pack_linear

W = torch.randn(384, 256, generator=torch.Generator().manual_seed(0))
X = torch.randn(700, 256, generator=torch.Generator().manual_seed(1))
PACKED = pack_linear(W)
BLOCKED = PACKED.blocked if isinstance(PACKED, Packed) else PACKED
needs_onednn = pytest.mark.skipif(not BLOCKED.is_mkldnn, reason="no oneDNN in this torch build")
needs_panels = pytest.mark.skipif(not isinstance(PACKED, Packed), reason="the panel kernel could not be built")


@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, SMALL_ROWS, SMALL_ROWS + 1, 127, 128, 129, 333, 700])
def test_matches_torch(M):
    y = linear(X[:M], PACKED)
    assert y.shape == (M, 384) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(X[:M], W), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_a_row_does_not_depend_on_the_row_count():
    """Padded or not, a row's result is the same bits on each path: the other rows touch nothing of it."""
    few, many = linear(X[:3], PACKED), linear(X[:SMALL_ROWS + 1], PACKED)[:3]
    for M in range(3, SMALL_ROWS + 1):
        assert torch.equal(linear(X[:M], PACKED)[:3], few), M
    for M in (SMALL_ROWS + 1, 100, 128, 129, 333, 700):
        assert torch.equal(linear(X[:M], PACKED)[:3], many), M


@needs_panels
def test_few_rows_take_the_panels_and_more_take_onednn():
    with torch.profiler.profile() as prof:
        for M in (1, SMALL_ROWS, SMALL_ROWS + 1):
            linear(X[:M], PACKED)
    seen = [e.name for e in prof.events() if e.name.startswith(("mkldnn::", "moe_serve_linear::"))]
    assert seen == ["moe_serve_linear::panel_linear"] * 2 + ["mkldnn::_linear_pointwise"]


@needs_panels
def test_panel_layout():
    """p[j, k, i] = w[16 j + i, k]: a panel's 16 outputs side by side for each input."""
    p = PACKED.panels
    assert p.shape == (384 // 16, 256, 16) and p.is_contiguous()
    j, k, i = 5, 17, 11
    assert p[j, k, i] == W[16 * j + i, k]
    assert torch.equal(p.permute(0, 2, 1).reshape(384, 256), W)


@needs_panels
def test_panel_kernel_edges():
    """Rows of a strided view, an empty batch and odd input widths (no vector multiple)."""
    w = torch.randn(32, 13, generator=torch.Generator().manual_seed(2))
    p = pack_linear(w)
    assert isinstance(p, Packed)
    x = torch.randn(7, 26, generator=torch.Generator().manual_seed(3))[:, ::2]
    torch.testing.assert_close(linear(x, p), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert linear(x[:0], p).shape == (0, 32)
    with pytest.raises(RuntimeError, match="must be"):
        torch.ops.moe_serve_linear.panel_linear(x.double(), p.panels)


def test_outputs_not_a_multiple_of_16_stay_blocked():
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(4))
    p = pack_linear(w)
    assert not isinstance(p, Packed)
    torch.testing.assert_close(linear(X[:3], p), F.linear(X[:3], w), atol=1e-4, rtol=1e-5)


def test_kernels_off_keeps_one_copy():
    """MOE_SERVE_CPU_KERNELS=0: no panels, the weight is held once."""
    code = ("import torch; from mixtral.linear import pack_linear, Packed; "
            "print(isinstance(pack_linear(torch.randn(32, 8)), Packed))")
    env = {**os.environ, "MOE_SERVE_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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


@needs_panels
def test_ffn_row_is_the_torch_ops_bit_for_bit():
    """One row through a SwiGLU expert in one call: the same bits as its torch ops on the same panels."""
    g = torch.Generator().manual_seed(5)
    D, Fh = 64, 48
    w13, w2 = torch.randn(2 * Fh, D, generator=g) / 8, torch.randn(D, Fh, generator=g) / 8
    p13, p2 = pack_linear(w13), pack_linear(w2)
    x = torch.randn(1, D, generator=g)
    scale = 0.3137
    gate, up = linear(x, p13).chunk(2, dim=-1)
    ref = linear(F.silu(gate) * up, p2) * scale
    got = linear_mod.ffn_row(x, p13, p2, scale)
    assert got.shape == (1, D) and torch.equal(got, ref)
    torch.testing.assert_close(got, F.linear(F.silu(x @ w13[:Fh].T) * (x @ w13[Fh:].T), w2) * scale,
                               atol=1e-5, rtol=1e-5)
    # Off the panels (more rows, or weights as they are) it is the torch ops themselves.
    torch.testing.assert_close(linear_mod.ffn_row(x, w13, w2, scale), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="one row"):
        torch.ops.moe_serve_linear.panel_ffn_row(x.expand(2, -1).contiguous(), p13.panels, p2.panels, scale)


@needs_panels
@pytest.mark.parametrize("R", [1, 3, 8, 13, SMALL_ROWS])
def test_ffn_rows_are_the_torch_ops_bit_for_bit(R):
    """A batch's rows of one expert, each times its own weight: the torch ops' bits, whatever R."""
    g = torch.Generator().manual_seed(R)
    D, Fh = 48, 32
    w13, w2 = torch.randn(2 * Fh, D, generator=g) / 8, torch.randn(D, Fh, generator=g) / 8
    p13, p2 = pack_linear(w13), pack_linear(w2)
    x, scale = torch.randn(R, D, generator=g), torch.rand(R, generator=g)
    gate, up = linear(x, p13).chunk(2, dim=-1)
    ref = linear(F.silu(gate) * up, p2) * scale[:, None]
    got = linear_mod.ffn(x, p13, p2, scale)
    assert got.shape == (R, D) and torch.equal(got, ref)
    # Row 0 alone, through the one-row call, is the same bits as within the batch.
    assert torch.equal(linear_mod.ffn_row(x[:1], p13, p2, float(scale[0])), got[:1])
    with pytest.raises(RuntimeError, match="one weight per row"):
        torch.ops.moe_serve_linear.panel_ffn(x, p13.panels, p2.panels, scale[:-1] if R > 1 else scale.double())


@needs_panels
def test_ffn_add_is_index_add_of_the_rows_bit_for_bit():
    """A slice of rows gathered, through the expert, and added back in place: index_add_'s bits."""
    g = torch.Generator().manual_seed(7)
    T, D, Fh = 20, 48, 32
    w13, w2 = torch.randn(2 * Fh, D, generator=g) / 8, torch.randn(D, Fh, generator=g) / 8
    p13, p2 = pack_linear(w13), pack_linear(w2)
    y, base = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    rows, scale = torch.randperm(T, generator=g), torch.rand(T, generator=g)
    for start, n in ((0, T), (3, 9), (19, 1), (5, 0)):
        ref = base.clone().index_add_(0, rows[start:start + n], linear_mod.ffn(y[rows[start:start + n]], p13, p2,
                                                                              scale[start:start + n]))
        out = base.clone()
        linear_mod.ffn_add(out, y, rows, p13, p2, scale, start, n)
        assert torch.equal(out, ref), (start, n)
        untouched = torch.ones(T, dtype=torch.bool)
        untouched[rows[start:start + n]] = False
        assert torch.equal(out[untouched], base[untouched])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moe_serve_linear.panel_ffn_add(base, y, rows, p13.panels, p2.panels, scale, 15, 6)
    with pytest.raises(RuntimeError, match="out of y"):
        torch.ops.moe_serve_linear.panel_ffn_add(base, y, rows + T, p13.panels, p2.panels, scale, 0, 2)


@needs_panels
@pytest.mark.parametrize("M", [1, 7, 12, 13, 25, SMALL_ROWS])
def test_a_panels_outputs_do_not_depend_on_the_panel_beside_it(M):
    """Panels run two to a pass where the CPU has the registers for it, the last alone when
    their count is odd: an output is the same bits whichever panel shares its pass, and its
    row is the same bits whichever rows share theirs."""
    w48 = pack_linear(W[:48])       # 3 panels: a pair and one alone
    w64 = pack_linear(W[:64])       # 4 panels: two pairs
    w16 = pack_linear(W[16:32])     # panel 1 of the others, alone
    y48, y64, y16 = linear(X[:M], w48), linear(X[:M], w64), linear(X[:M], w16)
    assert torch.equal(y48, y64[:, :48])
    assert torch.equal(y16, y64[:, 16:32])
    assert torch.equal(linear(X[:1], w48), y48[:1])
    torch.testing.assert_close(y64, F.linear(X[:M], W[:64]), atol=1e-4, rtol=1e-5)
