"""Device placement and CUDA-graph padding, checked where no GPU is.

- On the `meta` device no value can be read back to the host: a path that runs there
  builds every tensor on the model's device and never syncs (the grouped experts, the
  attention side's per-layer segment).
- CUDA graphs replay per bucket of rows: the buckets, the padding rows (which must change
  nothing) and the switch that picks the path are tested by running the padded segments
  eagerly, the same code a graph captures.
"""

import asyncio

import pytest
import torch

from attention_service.attention import AttentionMetadata
from attention_service.config import EngineConfig
from attention_service.decode_graphs import DecodeGraphs
from attention_service.kv_cache import KVCache
from attention_service.model import AttentionModel
from attention_service.model_runner import ModelRunner
from attention_service.sampling_params import SamplingParams
from attention_service.scheduler import Scheduled
from attention_service.sequence import Sequence
from attention_service.transport import InProcessTransport
from cluster.local import build_engine
from expert_service.experts import ExpertWeights
from mixtral.checkpoint import expected_tensors
from mixtral.config import preset
from mixtral.cuda_graphs import BUCKETS, GraphCache, bucket_for, enabled, pad_rows
from router.dispatch import GroupBatch, Placement, combine, split_experts
from router.gating import route

META = torch.device("meta")


def _meta_model(cfg):
    w = {n: torch.empty(s, dtype=torch.bfloat16, device=META) for n, s in expected_tensors(cfg).items()}
    experts = {(l, e): tuple(w[f"model.layers.{l}.block_sparse_moe.experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3"))
               for l in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)}
    return AttentionModel(cfg, w), ExpertWeights(experts, cfg.num_local_experts)


def _scheduled(qlens, ctx, block_size):
    out = []
    for i, (q, L) in enumerate(zip(qlens, ctx)):
        s = Sequence(list(range(3, 3 + L)), SamplingParams(max_tokens=4))
        s.num_computed = L - q
        s.block_table = list(range(i * 8, i * 8 + -(-L // block_size)))
        out.append(Scheduled(s, q))
    return out


def test_attention_segment_and_experts_run_on_meta():
    """Every tensor a step builds is on the model's device, and the expert layer has no host sync."""
    cfg = preset("tiny")
    model, experts = _meta_model(cfg)
    kv = KVCache(cfg.num_hidden_layers, 64, 16, model.n_kv_heads, model.dim_head, torch.bfloat16, META)
    placement = Placement.by_expert(split_experts(8, 1), cfg.num_hidden_layers, 8)
    runner = ModelRunner(model, kv, InProcessTransport([experts]), placement)
    mb = runner.prepare(_scheduled([1, 5, 1, 20], [30, 5, 7, 40], 16))
    meta = mb.meta
    tensors = [mb.tokens, mb.positions, mb.logit_rows, meta.slot_mapping,
               *[t for b in meta.decode for t in (b.rows, b.blocks, b.mask)], *[p.slots for p in meta.prefill]]
    assert tensors and all(t.device == META for t in tensors)
    x = model.embed(mb.tokens)
    h = model.attention(0, x, *model.rope(mb.positions), kv.k[0], kv.v[0], meta)
    y = model.moe_input(0, h)
    ids, w = route(y, model.gate(0), model.top_k)
    out = experts.forward(0, y, ids.int(), w)                     # grouped: offsets stay on the device
    assert out.device == META and out.shape == y.shape and h.device == META


def test_decode_segment_runs_on_meta():
    cfg = preset("tiny")
    model, _ = _meta_model(cfg)
    kv = KVCache(cfg.num_hidden_layers, 64, 16, model.n_kv_heads, model.dim_head, torch.bfloat16, META)

    def kernel(q, k_cache, v_cache, tables, lens, block_size, scale):
        assert all(t.device == META for t in (q, k_cache, tables, lens))
        return torch.empty_like(q)

    graphs = DecodeGraphs(model, kv, kernel, 4096, capture=True, pad_eagerly=True)
    assert not graphs.cache.capture                                # never captures off CUDA
    gb = graphs.prepare([30, 7, 12], [[0, 1], [2], [3]])
    assert gb.bucket == 4 and all(t.device == META for t in (gb.positions, gb.slots, gb.tables, gb.lens))
    h, y, ids, w = graphs.run(0, torch.empty(3, cfg.hidden_size, dtype=torch.bfloat16, device=META), gb)
    assert h.shape == (3, cfg.hidden_size) and ids.shape == (3, 2) and ids.device == META


def test_combine_refuses_partials_on_another_device():
    out = torch.zeros(4, 8)
    b = GroupBatch(group=1, rows=torch.tensor([0, 2]), expert_ids=torch.zeros(2, 2, dtype=torch.int32),
                   weights=torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="group 1's partial sums are on meta, the hidden state on cpu"):
        combine([torch.empty(2, 8, device=META)], [b], out)
    combine([torch.ones(2, 8, dtype=torch.float64)], [b], out)      # same device, other dtype: converted
    assert out[0].eq(1).all() and out[1].eq(0).all()


def test_buckets_and_padding():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 17, 64, 65, 512)] == [1, 2, 4, 8, 24, 64, 96, 512]
    assert bucket_for(513) is None and list(BUCKETS) == sorted(BUCKETS)
    x = torch.arange(6.).view(3, 2)
    assert torch.equal(pad_rows(x, 5), torch.tensor([[0., 1], [2, 3], [4, 5], [0, 0], [0, 0]]))
    assert torch.equal(pad_rows(torch.tensor([[1, 2]]), 2, -1), torch.tensor([[1, 2], [-1, -1]]))
    assert pad_rows(x, 3) is x


def test_graphs_only_on_cuda_and_when_switched_on(monkeypatch):
    assert not enabled(True, "cpu") and not enabled(True, "meta") and not enabled(False, "cuda")
    assert enabled(True, "cuda")
    monkeypatch.setenv("MOE_SERVE_CUDA_GRAPHS", "0")
    assert not enabled(True, "cuda")
    calls = []
    cache = GraphCache("cpu")
    assert cache.run("k", lambda a: (calls.append(1) or a * 2,), (torch.ones(2),))[0].tolist() == [2, 2]
    assert calls == [1] and len(cache) == 0                         # called directly, nothing captured


def test_expert_padding_rows_change_nothing():
    """What a bucket's graph computes: the batch plus rows of no expert and weight 0."""
    g = torch.Generator().manual_seed(0)
    tensors = {(0, e): (torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g),
                        torch.randn(24, 16, generator=g)) for e in range(4)}
    shard = ExpertWeights(tensors, 4, grouped=True)
    y, w = torch.randn(5, 16, generator=g), torch.rand(5, 2, generator=g)
    ids = torch.tensor([[0, 1], [3, -1], [2, 0], [1, 3], [-1, 2]], dtype=torch.int32)
    plain = shard._forward_grouped(0, y, ids, w)
    b = bucket_for(5)
    padded = shard._forward_grouped(0, pad_rows(y, b), pad_rows(ids, b, -1), pad_rows(w, b))
    assert padded.shape[0] == 8 and torch.equal(padded[5:], torch.zeros(3, 16))
    torch.testing.assert_close(padded[:5], plain, rtol=1e-6, atol=1e-6)


def test_engine_switch_and_padded_decode_segments_give_the_same_tokens(tiny_ckpt):
    """cuda_graphs on CPU is ignored (eager path); the padded decode segments a graph would
    replay, run eagerly, give the same greedy tokens, and their padding rows touch only the
    scratch block."""
    prompts = [[1, 415, 5565, 28705 + i] * (i + 1) for i in range(5)]

    async def tokens(pad: bool, micro_batches: int = 1):
        engine, _ = build_engine(tiny_ckpt, EngineConfig(block_size=16, micro_batches=micro_batches))
        r = engine.runner
        assert not r.graphs.active                                  # off CUDA: eager, whatever the switch
        calls = []
        if pad:
            if r.decode_kernel is None:
                pytest.skip("the CPU decode kernel could not be built here")
            r.graphs = DecodeGraphs(engine.model, engine.kv, r.decode_kernel, engine.max_model_len,
                                    capture=True, pad_eagerly=True)
            seg = r.graphs.segment
            r.graphs.segment = lambda *a: calls.append(a[1].shape[0]) or seg(*a)
        seqs = await engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
        scratch = engine.kv.scratch_block * 16
        untouched = engine.kv.k[:, :scratch].abs().sum()            # all blocks but the scratch one
        return [s.output_ids for s in seqs], calls, untouched

    eager, none, k_eager = asyncio.run(tokens(False))
    padded, calls, k_padded = asyncio.run(tokens(True))
    assert none == [] and calls and set(calls) <= set(BUCKETS) and 8 in calls   # 5 decodes ride in the 8-bucket
    assert padded == eager and torch.equal(k_padded, k_eager)
    two, calls2, _ = asyncio.run(tokens(True, micro_batches=2))
    assert two == eager and calls2


def test_every_built_tensor_stays_on_the_model_device():
    """AttentionMetadata for kernels (decode batch, prompt batch) on the requested device."""
    meta = AttentionMetadata.build([1, 9, 1], [30, 9, 4], [[0, 1], [2], [3]], 16, META,
                                   decode_kernel=lambda *a: None, prefill_kernel=lambda *a: None)
    d, p = meta.decode_batch, meta.prefill_batch
    assert all(t.device == META for t in (meta.slot_mapping, d.rows, d.tables, d.lens, p.starts, p.qlens, p.lens,
                                          p.tables))
