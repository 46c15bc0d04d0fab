"""Decode steps from CUDA graphs: each layer's segment between expert calls, per batch bucket.

Shapes: B decoding sequences, Bb the bucket B is padded to, D hidden, K top-k, NB the
block-table width every graph is captured with (max_model_len / block size).

A layer of a decode step, as the runner splits it:

    h, y, ids, w = segment(layer, x)      captured: attention (the Triton decode kernel reading
                                          the paged cache in place), norm, router gate, top-k
    plan; await experts; x = h + combine  eager: which rows go where is data, not shape

The segment's inputs are fixed-shape device tensors: x [Bb, D], positions, slots, lens [Bb]
and tables [Bb, NB]. Padding rows are sequences of one token at position 0 living in the
cache's scratch block (KVCache.scratch_block): they write and read only that block, and
their rows are cut off before anything else sees them. The decode kernel's launch depends
on shapes only (its key splits come from NB), so one graph serves every step of a bucket.
Prompt chunks, mixed steps and batches past the largest bucket run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_service.attention import AttentionMetadata, DecodeBatch
from mixtral.cuda_graphs import BUCKETS, GraphCache, bucket_for, pad_rows
from router.gating import route


@dataclass
class GraphBatch:
    """One micro-batch of decodes, padded to its bucket, on the model's device."""
    rows: int                 # B real rows
    bucket: int               # Bb
    positions: torch.Tensor   # [Bb]
    slots: torch.Tensor       # [Bb] where each row's new K/V goes
    tables: torch.Tensor      # [Bb, NB]
    lens: torch.Tensor        # [Bb]


class DecodeGraphs:
    """capture: graphs on CUDA (EngineConfig.cuda_graphs); pad_eagerly: run the same padded
    segments without capturing (what a CPU test checks the padding with)."""

    def __init__(self, model, kv, decode_kernel, max_model_len: int, capture: bool = True,
                 pad_eagerly: bool = False):
        self.model, self.kv, self.kernel = model, kv, decode_kernel
        self.width = -(-max_model_len // kv.block_size)
        self.cache = GraphCache(model.device, capture and decode_kernel is not None)
        self.active = decode_kernel is not None and (self.cache.capture or pad_eagerly)
        self._tables: torch.Tensor | None = None     # [largest bucket, NB] host staging

    def prepare(self, lens: list[int], tables: list[list[int]]) -> GraphBatch | None:
        """Decodes of contexts lens (the new token included) -> the padded batch, or None when
        graphs do not apply (off, or more sequences than the largest bucket)."""
        B = len(lens)
        bucket = bucket_for(B) if self.active else None
        if bucket is None or max(lens) > self.width * self.kv.block_size:
            return None
        bs, scratch = self.kv.block_size, self.kv.scratch_block
        if self._tables is None:
            # Reused every step and copied out synchronously (the next micro-batch refills it):
            # a row is read only up to its context's last block, so what an earlier step left
            # past that is never seen. int32 on GPU halves the bytes sent.
            dtype = torch.int64 if self.model.device.type == "cpu" else torch.int32
            self._tables = torch.zeros(max(BUCKETS), self.width, dtype=dtype,
                                       pin_memory=self.model.device.type == "cuda")
        for i, (L, t) in enumerate(zip(lens, tables)):
            nb = -(-L // bs)
            self._tables[i, :nb] = torch.tensor(t[:nb], dtype=self._tables.dtype)
        self._tables[B:bucket, 0] = scratch
        slots = [t[(L - 1) // bs] * bs + (L - 1) % bs for L, t in zip(lens, tables)] + [scratch * bs] * (bucket - B)
        lens_t = torch.tensor(lens + [1] * (bucket - B), dtype=torch.int64)
        dev = self.model.device
        return GraphBatch(B, bucket, (lens_t - 1).to(dev), torch.tensor(slots, dtype=torch.int64).to(dev),
                          self._tables[:bucket].to(dev, copy=True), lens_t.to(dev))

    def segment(self, layer: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                tables: torch.Tensor, lens: torch.Tensor):
        """What a graph holds: x [Bb, D] -> h, y [Bb, D], ids, weights [Bb, K]."""
        m = self.model
        rows = torch.arange(x.shape[0], device=x.device)
        meta = AttentionMetadata(slots, self.kv.block_size, decode_batch=DecodeBatch(rows, tables, lens),
                                 decode_kernel=self.kernel)
        h = m.attention(layer, x, *m.rope(positions), self.kv.k[layer], self.kv.v[layer], meta)
        y = m.moe_input(layer, h)
        ids, weights = route(y, m.gate(layer), m.top_k)
        return h, y, ids, weights

    def run(self, layer: int, x: torch.Tensor, gb: GraphBatch):
        """x [B, D] -> h, y [B, D], ids, weights [B, K]: the segment on the padded batch, cut back to B."""
        inputs = (pad_rows(x, gb.bucket), gb.positions, gb.slots, gb.tables, gb.lens)
        outs = self.cache.run((layer, gb.bucket), lambda *a: self.segment(layer, *a), inputs)
        return tuple(o[:gb.rows] for o in outs)
