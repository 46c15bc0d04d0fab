"""Attention over the paged KV cache in place, on GPU: Triton kernels of our own.

Shapes: T new tokens this step, H heads, KVH kv heads, G = H / KVH query heads per kv head,
Dh head dim, S cache slots, C contexts (decodes or prompt chunks), NB blocks per table,
P splits of a context's keys.

One kernel serves both kinds of work, in one call per layer each (attention.py calls them
through the same interface as the CPU kernels, cpu_kernels.py):
- decodes: a tile is one sequence's token; its keys are split into P ranges run by separate
  programs (flash-decoding), so 8 sequences at 64K still fill the GPU; the P partial results
  are merged by their log-sum-exp.
- prompt chunks: a tile is BLOCK_Q consecutive tokens of one chunk, causal over the chunk
  and everything cached before it; P = 1.
A program owns one kv head: the G query heads sharing it are rows of the same tile, so K/V
are read once for all of them and never expanded to H heads. Keys are addressed slot by
slot through the block table (slot = table[pos // bs] * bs + pos % bs), so any block size
works (16 included) and nothing is gathered into a copy first.

Why our own Triton rather than FlexAttention or FlashInfer: the design is the one the
widely used Triton paged-attention backends follow (GQA rows packed into the tile, split
keys for decode, block tables read in the kernel), it is ~150 lines we can read, it needs
no compile step of torch's own (FlexAttention on GPU wants torch.compile, with recompiles
as batch shapes change and block-size limits of its sparse masks) and no extra wheel
(FlashInfer is built per torch/CUDA pair). Triton ships with torch on CUDA machines. The
grid depends only on shapes the caller knows (no host sync), which CUDA graphs need.
Its correctness is tested on CPU by Triton's interpreter (TRITON_INTERPRET=1), against
the torch path and transformers (tests/test_triton_attention.py).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:     # CPU-only installs: available() says no and nothing here is called
    triton = tl = None


@functools.cache
def available(device_type: str) -> bool:
    """Whether the kernels can run on this device type: CUDA with Triton, or Triton's
    interpreter (TRITON_INTERPRET=1, read when triton is imported) on CPU."""
    if triton is None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:
    @triton.jit
    def _paged_attention(
        Q, K, V, O, OP, LSE,                          # O [T, H, Dh]; OP [T, H, P, Dh], LSE [T, H, P] fp32 when P > 1
        tables, starts, qlens, lens, tile_chunk, tile_q,
        num_chunks, scale, H,
        sq_t, sq_h, sk_s, sk_h, so_t, so_h, s_tab,
        G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BS: tl.constexpr, DH: tl.constexpr, P: tl.constexpr, IEEE: tl.constexpr,
    ):
        tile, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        c = tl.load(tile_chunk + tile)
        if c >= num_chunks:            # grids are sized by an upper bound on the tiles
            return
        q0 = tl.load(tile_q + tile)                   # first query of the tile within its chunk
        qlen, L = tl.load(qlens + c), tl.load(lens + c)
        row0 = tl.load(starts + c) + q0
        M: tl.constexpr = BLOCK_Q * G_PAD
        r = tl.arange(0, M)
        qi, g = r // G_PAD, r % G_PAD                 # tile row -> (query of the tile, head of the group)
        d = tl.arange(0, DH)
        row_ok = (q0 + qi < qlen) & (g < G)
        head = kvh * G + g
        q = tl.load(Q + (row0 + qi)[:, None] * sq_t + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None],
                    other=0.0)
        qpos = L - qlen + q0 + qi                     # absolute position of each row's query
        # This program's keys: its split of [0, end), end = one past the tile's last query.
        end = tl.minimum(L, L - qlen + q0 + BLOCK_Q)
        per = tl.cdiv(tl.cdiv(end, P), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(end, lo + per)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, DH], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            ok = pos < hi
            blk = tl.load(tables + c * s_tab + pos // BS, mask=ok, other=0)
            slot = blk.to(tl.int64) * BS + pos % BS
            kv_off = slot[:, None] * sk_s + kvh * sk_h + d[None, :]
            k = tl.load(K + kv_off, mask=ok[:, None], other=0.0)
            v = tl.load(V + kv_off, mask=ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(ok[None, :] & (pos[None, :] <= qpos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no key yet stay at zero
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        rows = row0 + qi
        if P == 1:
            tl.store(O + rows[:, None] * so_t + head[:, None] * so_h + d[None, :], out.to(O.dtype.element_ty),
                     mask=row_ok[:, None])
        else:   # decode: tiles are sequences, one query each; partials indexed by the tile
            base = (tile * H + head) * P + split
            tl.store(OP + base[:, None] * DH + d[None, :], out, mask=row_ok[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(LSE + base, lse, mask=row_ok)


# Keys per loop step: 64 rows of K and V (16 KiB each at Dh 128 in bf16) per program.
_BLOCK_N = 64
# Queries per prompt tile, before multiplying by the heads of a group: 16 x 8 rows at 8x22B.
_BLOCK_Q = 16


def decode_splits(num_seqs: int, num_kv_heads: int, max_len: int, device: torch.device | str) -> int:
    """How many programs share one sequence's keys: enough for ~2 waves of the GPU's
    multiprocessors, never fewer than _BLOCK_N keys each. A function of shapes only, so a
    CUDA graph captured for a batch size keeps its grid."""
    dev = torch.device(device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    want = -(-2 * sms // max(1, num_seqs * num_kv_heads))
    return max(1, min(want, 64, -(-max_len // _BLOCK_N)))


def _launch(q, k_cache, v_cache, out, tables, starts, qlens, lens, tile_chunk, tile_q, block_size, scale,
            block_q, splits, op=None, lse=None):
    H, Dh = q.shape[1], q.shape[2]
    KVH = k_cache.shape[1]
    G = H // KVH
    g_pad = max(_pow2(G), 16 // block_q)       # tl.dot wants 16 rows at least
    dummy = out if op is None else op
    grid = (tile_chunk.shape[0], KVH, splits)
    _paged_attention[grid](
        q, k_cache, v_cache, out, dummy, dummy if lse is None else lse,
        tables, starts, qlens, lens, tile_chunk, tile_q,
        qlens.shape[0], scale, H,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        tables.stride(0),
        G=G, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=_BLOCK_N, BS=block_size, DH=Dh, P=splits,
        IEEE=q.dtype == torch.float32,
        # Prompt tiles hold BLOCK_Q x G_PAD rows (128 at 8x22B): more warps keep their fp32
        # accumulator [rows, Dh] in registers.
        num_warps=8 if block_q * g_pad >= 64 else 4)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lens: torch.Tensor, block_size: int, scale: float, splits: int | None = None,
                           max_len: int | None = None) -> torch.Tensor:
    """q [B, H, Dh] (one token per sequence, the last of its context); caches [S, KVH, Dh];
    tables [B, NB]; lens [B] -> out [B, H, Dh]. The interface of cpu_kernels' decode kernel.

    splits: programs per (sequence, kv head); unset, from the table width (the longest
    context it can hold), so the launch depends on shapes only."""
    B, H, Dh = q.shape
    if splits is None:
        splits = decode_splits(B, k_cache.shape[1], max_len or tables.shape[1] * block_size, q.device)
    out = torch.empty_like(q)
    idx = torch.arange(B, dtype=torch.int32, device=q.device)
    zeros = torch.zeros(B, dtype=torch.int32, device=q.device)
    if splits == 1:
        _launch(q, k_cache, v_cache, out, tables, idx, torch.ones_like(idx), lens, idx, zeros, block_size, scale, 1, 1)
        return out
    op = torch.empty(B, H, splits, Dh, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    _launch(q, k_cache, v_cache, out, tables, idx, torch.ones_like(idx), lens, idx, zeros, block_size, scale, 1,
            splits, op, lse)
    # Merge the splits: each is normalised within its keys; weigh them by their share of the
    # softmax mass (empty splits have lse -inf and weigh nothing).
    w = torch.softmax(lse, dim=-1)                                     # [B, H, P]
    return (op * w[..., None]).sum(2).to(q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                            starts: torch.Tensor, qlens: torch.Tensor, lens: torch.Tensor, block_size: int,
                            scale: float) -> torch.Tensor:
    """q [T, H, Dh]; caches [S, KVH, Dh]; per chunk c: tables [C, NB], starts, qlens, lens [C]
    -> out [T, H, Dh] with every chunk's rows. The interface of cpu_kernels' prompt kernel.

    The tiles (chunk, first query) are laid out on the device: their count is bounded by
    ceil(T / BLOCK_Q) + C, so the grid needs no number read back from the GPU."""
    T, C = q.shape[0], qlens.shape[0]
    out = torch.empty_like(q)
    per_chunk = (qlens + _BLOCK_Q - 1) // _BLOCK_Q                      # [C] tiles of each chunk
    ends = torch.cumsum(per_chunk, 0)
    n_max = -(-T // _BLOCK_Q) + C
    tile = torch.arange(n_max, device=q.device)
    chunk = torch.searchsorted(ends, tile, right=True)                 # C past the last tile: the kernel skips it
    first = torch.cat([ends.new_zeros(1), ends])[chunk.clamp(max=C)]   # first tile of the tile's chunk
    tile_q = ((tile - first) * _BLOCK_Q).to(torch.int32)
    _launch(q, k_cache, v_cache, out, tables, starts, qlens, lens, chunk.to(torch.int32), tile_q, block_size,
            scale, _BLOCK_Q, 1)
    return out
