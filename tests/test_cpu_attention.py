"""CPU attention paths against the torch paths they replace: decode and prompt chunks over the
paged cache (our kernels), prompt chunks after cached tokens (torch's flash kernel, merged)."""

import os
import subprocess
import sys

import pytest
import torch
from paged_case import paged_case

from attention_service import cpu_kernels
from attention_service.attention import AttentionMetadata, after_cached, after_cached_masked, paged_attention

KERNEL = cpu_kernels.paged_decode_attention(torch.float32, "cpu")
PREFILL = cpu_kernels.paged_prefill_attention(torch.float32, "cpu")
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the CPU kernels could not be built here (no compiler?)")


def _case(H, KVH, Dh, bs, lens, seed=0):
    """A shuffled paged cache holding len(lens) contexts -> (q, k, v, caches, tables)."""
    return paged_case(H, KVH, Dh, bs, lens, seed=seed)


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


def test_kernels_apply_to_cpu_fp32_only():
    for kernel in (cpu_kernels.paged_decode_attention, cpu_kernels.paged_prefill_attention):
        assert kernel(torch.bfloat16, "cpu") is None
        assert kernel(torch.float32, "meta") is None


def test_switched_off_by_environment():
    code = ("import torch; from attention_service import cpu_kernels; "
            "print(cpu_kernels.paged_decode_attention(torch.float32, 'cpu'), "
            "cpu_kernels.paged_prefill_attention(torch.float32, 'cpu'))")
    env = {**os.environ, "MOE_SERVE_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"


def _chunks(H, KVH, Dh, bs, chunks, seed=0):
    """A shuffled paged cache holding the contexts of chunks [(context length L, new tokens n)],
    their K/V already written -> (q [sum n, H, Dh], caches, block tables)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // bs) for L, _ in chunks]
    order = torch.randperm(sum(need) + 3, generator=g).tolist()
    tables = [order[sum(need[:i]):sum(need[:i + 1])] for i in range(len(chunks))]
    S = (sum(need) + 3) * bs
    kc, vc = torch.randn(S, KVH, Dh, generator=g), torch.randn(S, KVH, Dh, generator=g)
    return torch.randn(sum(n for _, n in chunks), H, Dh, generator=g), kc, vc, tables


def _by_definition(q, kc, vc, tables, chunks, bs):
    """Causal attention of each chunk's rows over its context, written out in float64."""
    H, Dh = q.shape[1:]
    out, row = torch.empty_like(q), 0
    for table, (L, n) in zip(tables, chunks):
        slots = (torch.tensor(table)[:, None] * bs + torch.arange(bs)).flatten()[:L]
        k, v = (c[slots].transpose(0, 1).repeat_interleave(H // kc.shape[1], 0).double() for c in (kc, vc))
        scores = q[row:row + n].transpose(0, 1).double() @ k.transpose(-1, -2) * Dh ** -0.5   # [H, n, L]
        scores.masked_fill_(torch.arange(L) > L - n + torch.arange(n)[:, None], float("-inf"))
        out[row:row + n] = (scores.softmax(-1) @ v).transpose(0, 1).float()
        row += n
    return out


def _prefill(q, kc, vc, tables, chunks, bs):
    """All chunks through the kernel, laid out as paged_attention lays them out."""
    meta = AttentionMetadata.build([n for _, n in chunks], [L for L, _ in chunks], tables, bs, prefill_kernel=PREFILL)
    assert meta.prefill == [] and meta.prefill_batch is not None
    p = meta.prefill_batch
    return PREFILL(q, kc, vc, p.tables, p.starts, p.qlens, p.lens, bs, q.shape[-1] ** -0.5)


# Whole prompts, chunks after cached tokens (within a block, across many), one-token prompts.
CHUNKS = [(2, 2), (37, 37), (100, 5), (300, 64), (70, 33), (600, 600)]


@needs_kernel
@pytest.mark.parametrize("H,KVH,Dh", [(8, 2, 64), (32, 8, 128), (4, 2, 16), (3, 3, 32), (6, 1, 8), (5, 5, 24)])
@pytest.mark.parametrize("bs", [1, 4, 16, 32])
def test_prefill_kernel_matches_attention(H, KVH, Dh, bs):
    q, kc, vc, tables = _chunks(H, KVH, Dh, bs, CHUNKS)
    out = _prefill(q, kc, vc, tables, CHUNKS, bs)
    torch.testing.assert_close(out, _by_definition(q, kc, vc, tables, CHUNKS, bs), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_prefill_kernel_long_context():
    chunks = [(9000, 1000), (3000, 3000)]
    q, kc, vc, tables = _chunks(8, 2, 64, 32, chunks, seed=2)
    out = _prefill(q, kc, vc, tables, chunks, 32)
    torch.testing.assert_close(out, _by_definition(q, kc, vc, tables, chunks, 32), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_prompt_row_does_not_depend_on_chunking_or_batch():
    """A prompt of 300 in one chunk, as 3 + 97 + 200, and beside other chunks: the same bits."""
    q, kc, vc, tables = _chunks(8, 2, 64, 16, [(300, 300), (500, 120)], seed=3)
    whole = _prefill(q[:300], kc, vc, tables[:1], [(300, 300)], 16)
    parts = [_prefill(q[s:e], kc, vc, tables[:1], [(e, e - s)], 16) for s, e in ((0, 3), (3, 100), (100, 300))]
    assert torch.equal(torch.cat(parts), whole)
    together = _prefill(q, kc, vc, tables, [(300, 300), (500, 120)], 16)
    assert torch.equal(together[:300], whole)


@needs_kernel
def test_prefill_kernel_refuses_bad_input():
    q, kc, vc, tables = _chunks(8, 2, 64, 16, [(40, 10)])
    tab, one = torch.tensor(tables), torch.tensor([0])
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        PREFILL(q, kc, vc, tab, one, torch.tensor([10]), torch.tensor([49]), 16, 0.125)
    with pytest.raises(RuntimeError, match="new tokens in a context of"):
        PREFILL(q, kc, vc, tab, one, torch.tensor([10]), torch.tensor([9]), 16, 0.125)
    with pytest.raises(RuntimeError, match="rows out of range"):
        PREFILL(q, kc, vc, tab, torch.tensor([5]), torch.tensor([10]), torch.tensor([40]), 16, 0.125)
    with pytest.raises(RuntimeError, match="fp32"):
        PREFILL(q.double(), kc, vc, tab, one, torch.tensor([10]), torch.tensor([40]), 16, 0.125)


@needs_kernel
def test_mixed_step_through_both_kernels_matches_torch():
    """paged_attention on a step of decodes and prompt chunks: kernels against torch's path,
    the new K/V written into the cache by both."""
    H, KVH, Dh, bs = 8, 2, 64, 16
    qlens, lens = [1, 50, 1, 1, 200, 1], [30, 50, 1, 700, 260, 65]
    q, kc, vc, tables = _chunks(H, KVH, Dh, bs, list(zip(lens, qlens)), seed=4)
    k, v = torch.randn(len(q), KVH, Dh), torch.randn(len(q), KVH, Dh)
    ref_k, ref_v = kc.clone(), vc.clone()
    ref = paged_attention(q, k, v, ref_k, ref_v, AttentionMetadata.build(qlens, lens, tables, bs))
    meta = AttentionMetadata.build(qlens, lens, tables, bs, decode_kernel=KERNEL, prefill_kernel=PREFILL)
    out = paged_attention(q, k, v, kc, vc, meta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


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
