"""CPU attention paths against the torch paths they replace: decode over the paged cache, prompt chunks."""

import os
import subprocess
import sys

import pytest
import torch

from attention_service import cpu_kernels
from attention_service.attention import AttentionMetadata, after_cached, after_cached_masked, paged_attention

KERNEL = cpu_kernels.paged_decode_attention(torch.float32, "cpu")
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the CPU kernel could not be built here (no compiler?)")


def _case(H, KVH, Dh, bs, lens, seed=0):
    """A shuffled paged cache holding len(lens) contexts -> (q, k, v, caches, tables)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // bs) for L in lens]
    order = torch.randperm(sum(need) + 3, generator=g).tolist()       # blocks out of order, some unused
    tables, i = [], 0
    for n in need:
        tables.append(order[i:i + n])
        i += n
    S = (sum(need) + 3) * bs
    kc, vc = torch.randn(S, KVH, Dh, generator=g), torch.randn(S, KVH, Dh, generator=g)
    q = torch.randn(len(lens), H, Dh, generator=g)
    k, v = torch.randn(len(lens), KVH, Dh, generator=g), torch.randn(len(lens), KVH, Dh, generator=g)
    return q, k, v, kc, vc, tables


def _both(H, KVH, Dh, bs, lens, seed=0):
    """Decode attention over the same cache, by the kernel and by torch's buckets."""
    q, k, v, kc, vc, tables = _case(H, KVH, Dh, bs, lens, seed)
    ones = [1] * len(lens)
    ref = paged_attention(q, k, v, kc.clone(), vc.clone(), AttentionMetadata.build(ones, lens, tables, bs))
    meta = AttentionMetadata.build(ones, lens, tables, bs, decode_kernel=KERNEL)
    assert meta.decode == [] and meta.decode_batch is not None
    out = paged_attention(q, k, v, kc, vc, meta)
    return out, ref


@needs_kernel
@pytest.mark.parametrize("H,KVH,Dh", [(8, 2, 64), (32, 8, 128), (4, 2, 16), (3, 3, 32), (6, 1, 8), (5, 5, 24)])
@pytest.mark.parametrize("bs", [1, 4, 16])
def test_kernel_matches_torch(H, KVH, Dh, bs):
    lens = [1, bs, bs + 1, 3 * bs - 1, 37, 200]                    # one token, whole and partial blocks
    out, ref = _both(H, KVH, Dh, bs, lens)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_long_context_and_many_sequences():
    lens = torch.randint(1, 3000, (40,), generator=torch.Generator().manual_seed(1)).tolist() + [8192]
    out, ref = _both(8, 2, 64, 16, lens, seed=1)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    """The same sequence alone and among others gives bit-identical results."""
    q, k, v, kc, vc, tables = _case(8, 2, 64, 16, [500, 77, 1200, 3])
    lens = torch.tensor([500, 77, 1200, 3])
    tab = torch.tensor([t + [0] * (75 - len(t)) for t in tables])
    together = KERNEL(q, kc, vc, tab, lens, 16, 0.125)
    for i in range(4):
        alone = KERNEL(q[i:i + 1].contiguous(), kc, vc, tab[i:i + 1].contiguous(), lens[i:i + 1], 16, 0.125)
        assert torch.equal(alone[0], together[i])


@needs_kernel
def test_bad_input_is_refused():
    q, k, v, kc, vc, tables = _case(8, 2, 64, 16, [40])
    tab, lens = torch.tensor(tables), torch.tensor([40])
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        KERNEL(q, kc, vc, tab, torch.tensor([49]), 16, 0.125)          # 3 blocks hold 48
    with pytest.raises(RuntimeError, match="fp32"):
        KERNEL(q.double(), kc, vc, tab, lens, 16, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        KERNEL(q, kc, vc, tab.int(), lens, 16, 0.125)


def test_kernel_applies_to_cpu_fp32_only():
    assert cpu_kernels.paged_decode_attention(torch.bfloat16, "cpu") is None
    assert cpu_kernels.paged_decode_attention(torch.float32, "meta") is None


def test_switched_off_by_environment():
    code = ("import torch; from attention_service import cpu_kernels; "
            "print(cpu_kernels.paged_decode_attention(torch.float32, 'cpu'))")
    env = {**os.environ, "MOE_SERVE_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


@pytest.mark.parametrize("H,KVH,c,n", [(8, 2, 1, 5), (8, 2, 300, 700), (4, 4, 1500, 37), (6, 1, 64, 1100)])
def test_prompt_chunk_after_cached_tokens(H, KVH, c, n):
    """The CPU path (cached keys unmasked + the chunk causal, merged by log-sum-exp) against
    one masked call over all keys, and against attention written out in full."""
    g = torch.Generator().manual_seed(c + n)
    q = torch.randn(1, H, n, 32, generator=g)
    k_old, v_old, k_new, v_new = (torch.randn(1, KVH, m, 32, generator=g) for m in (c, c, n, n))
    fast = after_cached(q, k_old, v_old, k_new, v_new)
    masked = after_cached_masked(q, k_old, v_old, k_new, v_new)
    k = torch.cat([k_old, k_new], 2).repeat_interleave(H // KVH, 1)
    v = torch.cat([v_old, v_new], 2).repeat_interleave(H // KVH, 1)
    scores = q @ k.transpose(-1, -2) / 32 ** 0.5                              # [1, H, n, c + n]
    scores.masked_fill_(torch.arange(c + n) > c + torch.arange(n)[:, None], float("-inf"))
    full = scores.softmax(-1) @ v
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, full, atol=1e-5, rtol=1e-5)
