"""Paged attention: K/V live in fixed-size blocks of one flat cache; sequences own block tables.

Shapes: T new tokens this step, H heads, KVH kv heads, Dh head dim, S cache slots
(blocks x block size), B sequences, L context length (cached + new).

One step mixes single-token decodes with multi-token prefill chunks. Decodes are batched
into one attention call per bucket of similar context length (padding a 100-token
context to a 64K one would cost a 64K gather); each prefill chunk runs on its own with a
causal mask offset by the tokens already cached.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Gathered decode contexts per bucket are capped at this many slots (B x Lmax).
_DECODE_BUCKET_SLOTS = 1 << 20
# Prefill queries are processed in blocks of this many rows, bounding the mask's size.
_PREFILL_QUERY_BLOCK = 1024


@dataclass
class DecodeBucket:
    rows: torch.Tensor   # [B] rows of the step's T tokens
    slots: torch.Tensor  # [B, Lmax] cache slots of each context, padded with 0
    mask: torch.Tensor   # [B, 1, 1, Lmax] True where the slot is part of the context


@dataclass
class PrefillChunk:
    start: int           # rows [start, start + q) of the step's T tokens
    q: int               # new tokens in this chunk
    slots: torch.Tensor  # [L] cache slots of the whole context, L = cached + q


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's layout; built once, used by every layer."""

    slot_mapping: torch.Tensor                        # [T] where each new token's K/V is written
    decode: list[DecodeBucket] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Per sequence: q new tokens ending a context of L tokens, whose blocks are block_table."""
        offsets = torch.arange(block_size)
        slot_lists, slot_mapping, decodes, prefill = [], [], [], []
        row = 0
        for q, L, table in zip(query_lens, context_lens, block_tables):
            blocks = torch.tensor(table[: (L + block_size - 1) // block_size], dtype=torch.int64)
            slots = (blocks[:, None] * block_size + offsets).flatten()[:L]        # [L]
            slot_mapping.append(slots[L - q:])
            if q == 1:
                decodes.append((row, slots))
            else:
                prefill.append(PrefillChunk(row, q, slots.to(device)))
            row += q
        meta = cls(torch.cat(slot_mapping).to(device) if slot_mapping else torch.empty(0, dtype=torch.int64),
                   prefill=prefill)
        meta.decode = _bucket_decodes(decodes, device)
        return meta


def _bucket_decodes(decodes: list[tuple[int, torch.Tensor]], device) -> list[DecodeBucket]:
    decodes = sorted(decodes, key=lambda d: -len(d[1]))
    buckets, i = [], 0
    while i < len(decodes):
        Lmax = len(decodes[i][1])
        n = max(1, min(len(decodes) - i, _DECODE_BUCKET_SLOTS // max(Lmax, 1)))
        part = decodes[i:i + n]
        slots = torch.zeros(n, Lmax, dtype=torch.int64)
        mask = torch.zeros(n, 1, 1, Lmax, dtype=torch.bool)
        for j, (_, s) in enumerate(part):
            slots[j, : len(s)] = s
            mask[j, ..., : len(s)] = True
        rows = torch.tensor([r for r, _ in part], dtype=torch.int64)
        buckets.append(DecodeBucket(rows.to(device), slots.to(device), mask.to(device)))
        i += n
    return buckets


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, Dh], new k/v [T, KVH, Dh]; caches [S, KVH, Dh] of one layer -> out [T, H, Dh].

    Writes the new K/V into the cache first, so every context is read from one place.
    """
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    KVH, Dh = k_cache.shape[1:]
    for b in meta.decode:
        B, Lmax = b.slots.shape
        # index_select over flat slots reads the cache about twice as fast as fancy indexing.
        kb = k_cache.index_select(0, b.slots.flatten()).view(B, Lmax, KVH, Dh).transpose(1, 2)  # [B, KVH, Lmax, Dh]
        vb = v_cache.index_select(0, b.slots.flatten()).view(B, Lmax, KVH, Dh).transpose(1, 2)
        # One token per sequence: the H/KVH query heads sharing a KV head are its "queries",
        # so K/V are never expanded to H heads.
        qb = q[b.rows].view(B, KVH, -1, Dh)                          # [B, KVH, H/KVH, Dh]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask)
        out[b.rows] = ob.reshape(B, -1, Dh)
    for p in meta.prefill:
        L = len(p.slots)
        qp = q[p.start:p.start + p.q].transpose(0, 1)                # [H, q, Dh]
        if L == p.q:   # nothing cached before this chunk: attend to the fresh K/V directly
            kp, vp = k[p.start:p.start + p.q].transpose(0, 1), v[p.start:p.start + p.q].transpose(0, 1)
        else:
            kp, vp = k_cache[p.slots].transpose(0, 1), v_cache[p.slots].transpose(0, 1)   # [KVH, L, Dh]
        for s in range(0, p.q, _PREFILL_QUERY_BLOCK):
            e = min(s + _PREFILL_QUERY_BLOCK, p.q)
            # Query i of the chunk sits at position L - q + i and sees keys 0 .. L - q + i.
            qpos = torch.arange(L - p.q + s, L - p.q + e, device=q.device)
            mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]     # [e - s, L]
            o = F.scaled_dot_product_attention(qp[:, s:e], kp, vp, attn_mask=mask, enable_gqa=True)
            out[p.start + s:p.start + e] = o.transpose(0, 1)
    return out
