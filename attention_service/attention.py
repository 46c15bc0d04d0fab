"""Paged attention: K/V live in fixed-size blocks of one flat cache; sequences own block tables.

Shapes: T new tokens this step, H heads, KVH kv heads, Dh head dim, S cache slots
(blocks x block size), B sequences, L context length (cached + new).

One step mixes single-token decodes with multi-token prefill chunks. Decodes are sorted by
context length and batched into one attention call per bucket of neighbours, each context
gathered whole blocks at a time and padded to its bucket's longest. Buckets are kept small
(_DECODE_BUCKET_SLOTS): padding every context of a step to the longest would gather ~1.7x
the real context on the benchmark's 41-566 spread (and a 100-token context padded to a 64K
one would cost a 64K gather), and on CPU a few small gathers that stay in cache beat one
big one even without padding. Each prefill chunk runs on its own: causal over its own K/V, and when
tokens are cached before it, those too (after_cached).

That is torch's path, kept where no kernel of ours applies. Kernels that walk the block
tables and read the cache in place take both kinds instead: one call per layer for all of a
step's decodes and one for all of its prompt chunks, no copies. On CUDA the Triton kernels
(attention_service/triton_attention.py), on CPU in fp32 the C++ ones (cpu_kernels.py);
model_runner.attention_kernels picks.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Gathered decode contexts per bucket are capped at this many slots (B x Lmax), but a
# bucket always takes at least one context: 4096 slots are 2 MiB each of K and V per layer
# on the benchmark model (2 kv heads x 64 x fp32), which stay in the benchmark CPU's cache
# (1 MiB of L2 per core, 32 MiB of L3) between the gather and the attention call.
_DECODE_BUCKET_SLOTS = 4096
# Masked prefill chunks (after_cached_masked) take queries in blocks of this many rows,
# bounding the mask's size.
_PREFILL_QUERY_BLOCK = 1024


@dataclass
class DecodeBucket:
    rows: torch.Tensor    # [B] rows of the step's T tokens
    blocks: torch.Tensor  # [B * nb] cache blocks of each context in order, padded with block 0
    mask: torch.Tensor    # [B, 1, 1, nb * block size] True where the slot is part of the context


@dataclass
class DecodeBatch:
    """All of a step's decodes at once, for a kernel that reads the cache in place."""
    rows: torch.Tensor    # [B] rows of the step's T tokens
    tables: torch.Tensor  # [B, NB] each context's blocks, padded with block 0
    lens: torch.Tensor    # [B] context lengths


@dataclass
class PrefillBatch:
    """All of a step's prompt chunks at once, for a kernel that reads the cache in place."""
    starts: torch.Tensor  # [C] first row of each chunk among the step's T tokens
    qlens: torch.Tensor   # [C] new tokens of each chunk
    lens: torch.Tensor    # [C] context lengths, the chunk included
    tables: torch.Tensor  # [C, NB] each context's blocks, padded with block 0


@dataclass
class PrefillChunk:
    start: int           # rows [start, start + q) of the step's T tokens
    q: int               # new tokens in this chunk
    slots: torch.Tensor  # [L] cache slots of the whole context, L = cached + q


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's layout; built once, used by every layer."""

    slot_mapping: torch.Tensor                        # [T] where each new token's K/V is written
    block_size: int
    decode: list[DecodeBucket] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    # Set together: the decodes go to decode_kernel (cpu_kernels.paged_decode_attention)
    # instead of the buckets above.
    decode_batch: DecodeBatch | None = None
    decode_kernel: Callable | None = None
    # Set together: the prompt chunks go to prefill_kernel (cpu_kernels.paged_prefill_attention)
    # instead of the list above.
    prefill_batch: PrefillBatch | None = None
    prefill_kernel: Callable | None = None

    @property
    def kernels_only(self) -> bool:
        """Every token goes to a kernel reading the cache: the new K/V are needed only there."""
        return not self.decode and not self.prefill

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu", decode_kernel: Callable | None = None,
              prefill_kernel: Callable | None = None) -> "AttentionMetadata":
        """Per sequence: q new tokens ending a context of L tokens, whose blocks are block_table.

        decode_kernel, prefill_kernel: where given, the decodes (prompt chunks) are laid out
        for it rather than in buckets (one by one)."""
        offsets = torch.arange(block_size)
        slot_mapping, decodes, chunks = [], [], []
        row = 0
        decode_slots: list[int] = []      # the current run of decodes' slots, one tensor per run
        for q, L, table in zip(query_lens, context_lens, block_tables):
            nb = (L + block_size - 1) // block_size
            if q == 1:
                decodes.append((row, L, table[:nb]))
                decode_slots.append(table[(L - 1) // block_size] * block_size + (L - 1) % block_size)
            else:
                if decode_slots:
                    slot_mapping.append(torch.tensor(decode_slots, dtype=torch.int64))
                    decode_slots = []
                blocks = torch.tensor(table[:nb], dtype=torch.int64)
                slots = (blocks[:, None] * block_size + offsets).flatten()[:L]        # [L]
                slot_mapping.append(slots[L - q:])
                chunks.append((row, q, L, table[:nb], slots))
            row += q
        if decode_slots:
            slot_mapping.append(torch.tensor(decode_slots, dtype=torch.int64))
        meta = cls(torch.cat(slot_mapping).to(device) if slot_mapping else torch.empty(0, dtype=torch.int64),
                   block_size)
        if decode_kernel is None:
            meta.decode = _bucket_decodes(decodes, block_size, device)
        elif decodes:
            meta.decode_kernel = decode_kernel
            meta.decode_batch = DecodeBatch(_ints([row for row, _, _ in decodes], device),
                                            _padded([table for _, _, table in decodes], device),
                                            _ints([L for _, L, _ in decodes], device))
        if prefill_kernel is None:
            meta.prefill = [PrefillChunk(row, q, slots.to(device)) for row, q, _, _, slots in chunks]
        elif chunks:
            meta.prefill_kernel = prefill_kernel
            rows, qs, lens, tables, _ = zip(*chunks)
            meta.prefill_batch = PrefillBatch(_ints(rows, device), _ints(qs, device), _ints(lens, device),
                                              _padded(tables, device))
        return meta


def _ints(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def _padded(tables, device) -> torch.Tensor:
    """Block tables as one [n, longest] tensor, padded with block 0."""
    width = max(len(t) for t in tables)
    return _ints([list(t) + [0] * (width - len(t)) for t in tables], device)


def _bucket_decodes(decodes: list[tuple[int, int, list[int]]], block_size: int, device) -> list[DecodeBucket]:
    """decodes: (row, L, the context's blocks) -> buckets of neighbours in length, longest first."""
    decodes = sorted(decodes, key=lambda d: -d[1])
    buckets, i = [], 0
    while i < len(decodes):
        Lmax = decodes[i][1]
        j = i + max(1, _DECODE_BUCKET_SLOTS // Lmax)
        part, nb = decodes[i:j], len(decodes[i][2])
        blocks = torch.tensor([b for _, _, table in part for b in table + [0] * (nb - len(table))], dtype=torch.int64)
        lens = torch.tensor([L for _, L, _ in part])
        mask = (torch.arange(nb * block_size) < lens[:, None]).view(len(part), 1, 1, -1)
        rows = torch.tensor([row for row, _, _ in part], dtype=torch.int64)
        buckets.append(DecodeBucket(rows.to(device), blocks.to(device), mask.to(device)))
        i = j
    return buckets


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, Dh], new k/v [T, KVH, Dh]; caches [S, KVH, Dh] of one layer -> out [T, H, Dh].

    Writes the new K/V into the cache first, so every context is read from one place.
    """
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    if meta.kernels_only:
        return attend(q, k_cache, v_cache, meta)
    out = attend(q, k_cache, v_cache, meta)
    KVH, Dh = k_cache.shape[1:]
    bs = meta.block_size
    for b in meta.decode:
        B, Lmax = b.mask.shape[0], b.mask.shape[-1]
        # Whole blocks (bs x KVH x Dh contiguous) at a time: index_select copies them faster
        # than slot by slot, and much faster than fancy indexing.
        # [B, KVH, Lmax, Dh]
        kb = k_cache.view(-1, bs, KVH, Dh).index_select(0, b.blocks).view(B, Lmax, KVH, Dh).transpose(1, 2)
        vb = v_cache.view(-1, bs, KVH, Dh).index_select(0, b.blocks).view(B, Lmax, KVH, Dh).transpose(1, 2)
        # One token per sequence: the H/KVH query heads sharing a KV head are its "queries",
        # so K/V are never expanded to H heads.
        qb = q[b.rows].view(B, KVH, -1, Dh)                          # [B, KVH, H/KVH, Dh]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask)
        out[b.rows] = ob.reshape(B, -1, Dh)
    for p in meta.prefill:
        L = len(p.slots)
        # 4-D [1, heads, len, Dh]: torch's CPU flash kernel only takes 4-D inputs (3-D ones fall
        # back to the unfused math path, 3x slower here).
        qp = q[p.start:p.start + p.q].transpose(0, 1)[None]          # [1, H, q, Dh]
        kn, vn = k[p.start:p.start + p.q].transpose(0, 1)[None], v[p.start:p.start + p.q].transpose(0, 1)[None]
        if L == p.q:   # nothing cached before this chunk: plain causal over its own K/V
            o = F.scaled_dot_product_attention(qp, kn, vn, is_causal=True, enable_gqa=True)
        else:
            old = p.slots[:L - p.q]
            kc, vc = k_cache[old].transpose(0, 1)[None], v_cache[old].transpose(0, 1)[None]   # [1, KVH, L - q, Dh]
            o = (after_cached if q.device.type == "cpu" else after_cached_masked)(qp, kc, vc, kn, vn)
        out[p.start:p.start + p.q] = o[0].transpose(0, 1)
    return out


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, Dh] of tokens whose K/V are already in the caches -> out [T, H, Dh] for the rows
    the kernels take (all of them when meta.kernels_only; the others are left unset)."""
    Dh, bs = k_cache.shape[2], meta.block_size
    d, p = meta.decode_batch, meta.prefill_batch
    if d is not None and p is None and d.rows.shape[0] == q.shape[0]:   # decodes only: rows are 0 .. T - 1
        return meta.decode_kernel(q.contiguous(), k_cache, v_cache, d.tables, d.lens, bs, Dh ** -0.5)
    if p is not None:   # the kernel's result holds every chunk's rows; decodes go in next
        out = meta.prefill_kernel(q, k_cache, v_cache, p.tables, p.starts, p.qlens, p.lens, bs, Dh ** -0.5)
    else:
        out = torch.empty_like(q)
    if d is not None:
        out[d.rows] = meta.decode_kernel(q[d.rows], k_cache, v_cache, d.tables, d.lens, bs, Dh ** -0.5)
    return out


def after_cached(q: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor) -> torch.Tensor:
    """A prompt chunk after c cached tokens: q [1, H, n, Dh]; cached K/V [1, KVH, c, Dh], the
    chunk's own [1, KVH, n, Dh] -> out [1, H, n, Dh].

    Every query sees all c cached keys and, causally, the chunk's keys up to its own. One
    masked call over all c + n keys would compute the full rectangle (torch's CPU kernel
    skips nothing for an explicit mask); instead the cached part runs unmasked and the new
    part causal, each returning its log-sum-exp, and the two are merged: ~25% fewer scores
    for an even split, and no mask to build. torch's CPU flash kernel with the log-sum-exp
    wants K/V with all H heads: for the cached keys the H / KVH query heads that share a
    KV head are stacked as more queries of it instead; the chunk's few keys are repeated.
    """
    _, H, n, Dh = q.shape
    KVH = k_old.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o_old, lse_old = flash(q.reshape(1, KVH, H // KVH * n, Dh), k_old, v_old, 0.0, False)
    o_old, lse_old = o_old.reshape(1, H, n, Dh), lse_old.reshape(1, H, n, 1)
    o_new, lse_new = flash(q, k_new.repeat_interleave(H // KVH, 1), v_new.repeat_interleave(H // KVH, 1), 0.0, True)
    lse_new = lse_new.reshape(1, H, n, 1)
    m = torch.maximum(lse_old, lse_new)
    w_old, w_new = (lse_old - m).exp_(), (lse_new - m).exp_()
    return (o_old * w_old).add_(o_new * w_new).div_(w_old + w_new)


def after_cached_masked(q: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, k_new: torch.Tensor,
                        v_new: torch.Tensor) -> torch.Tensor:
    """after_cached as one masked call per block of queries (the CPU flash kernel with a
    log-sum-exp is CPU only)."""
    n, c = q.shape[2], k_old.shape[2]
    k, v = torch.cat([k_old, k_new], 2), torch.cat([v_old, v_new], 2)    # [1, KVH, L, Dh]
    out = torch.empty_like(q)
    for s in range(0, n, _PREFILL_QUERY_BLOCK):
        e = min(s + _PREFILL_QUERY_BLOCK, n)
        # Query i of the chunk sits at position c + i and sees keys 0 .. c + i (is_causal would
        # align the chunk with key 0 instead).
        qpos = torch.arange(c + s, c + e, device=q.device)
        mask = torch.arange(c + n, device=q.device)[None, :] <= qpos[:, None]     # [e - s, L]
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask, enable_gqa=True)
    return out
