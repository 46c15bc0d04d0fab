"""One engine step on the model: lay out the batch, run the layer loop, sample.

Shapes: T tokens this step, D hidden, B sequences that sample, V vocab.

The layer loop is where the attention side meets the experts:

    x = embed(tokens)
    for layer:  h = attention(x);  y = norm(h);  route;  plan;  parts = await experts;  x = combine
    logits = lm_head(x[last positions])

A step's sequences are split into micro-batches that run the loop as concurrent
coroutines: while one waits for its expert RPCs, another computes its attention
(ping-pong). Their compute then runs on one worker thread, so the event loop stays free
to send and receive RPCs the moment they are ready (torch releases the GIL); one thread,
because the micro-batches take turns on the cores rather than share them. With one
micro-batch it is a plain loop on the caller's thread.
"""

import asyncio
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from attention_service import cpu_kernels, triton_attention
from attention_service.attention import AttentionMetadata
from attention_service.decode_graphs import DecodeGraphs, GraphBatch
from attention_service.grammar import apply_masks, start_masks
from attention_service.kv_cache import KVCache
from attention_service.model import AttentionModel
from attention_service.sampler import sample, top_logprobs
from attention_service.scheduler import Failed, Scheduled
from attention_service.sequence import Sequence
from attention_service.transport import ExpertTransport
from mixtral.greedy import pack_greedy
from router.dispatch import Placement, combine, plan
from router.gating import route

log = logging.getLogger(__name__)


def attention_kernels(dtype: torch.dtype, device: torch.device) -> tuple:
    """(decode kernel, prompt kernel) reading the paged cache in place, or (None, None) for
    torch's path (attention.py). On CUDA: the Triton kernels (triton_attention.py); on CPU
    in fp32: our C++ kernels (cpu_kernels.py). MOE_SERVE_ATTENTION=triton picks the Triton
    kernels wherever they run (on CPU: under TRITON_INTERPRET=1, for tests), =torch torch's path."""
    choice = os.environ.get("MOE_SERVE_ATTENTION", "auto")
    if choice == "torch":
        return None, None
    if triton_attention.available(device.type) and (device.type == "cuda" or choice == "triton"):
        return triton_attention.paged_decode_attention, triton_attention.paged_prefill_attention
    return cpu_kernels.paged_decode_attention(dtype, device), cpu_kernels.paged_prefill_attention(dtype, device)


@dataclass
class MicroBatch:
    tokens: torch.Tensor       # [T]
    positions: torch.Tensor    # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor   # rows whose logits are wanted
    upto: int = 0              # past every position: how far the rope tables must reach
    graph: GraphBatch | None = None   # set for all-decode micro-batches that replay CUDA graphs


class ModelRunner:
    def __init__(self, model: AttentionModel, kv: KVCache, transport: ExpertTransport, placement: Placement,
                 micro_batches: int = 1, cuda_graphs: bool = True, max_model_len: int | None = None,
                 greedy_screen: bool = True):
        self.model, self.kv, self.transport, self.placement = model, kv, transport, placement
        self.micro_batches = micro_batches
        self.on_route = None   # optional hook(layer, expert ids [T, K]) for routing statistics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="compute") if micro_batches > 1 else None
        self.decode_kernel, self.prefill_kernel = attention_kernels(model.dtype, model.device)
        if os.environ.get("MOE_SERVE_ATTENTION", "auto") != "torch":
            model.fused = cpu_kernels.fused_ops(model.dtype, model.device)
        if greedy_screen and model.greedy_head is None:
            model.greedy_head = pack_greedy(model.lm_head)
            if model.greedy_head is None:
                log.info("greedy_screen is on but does not apply here (it needs the lm_head in fp32 on a CPU "
                         "with AVX-512 BF16; this model: %s on %s): greedy steps compute every logit",
                         model.dtype, model.device)
        # Looked up once rather than in every layer of every step.
        self._kv_layers = [(kv.k[layer], kv.v[layer]) for layer in range(len(model.layers))]
        self._groups = [(placement.group_of[layer], placement.only_group(layer)) for layer in range(len(model.layers))]
        self.graphs = DecodeGraphs(model, kv, self.decode_kernel, max_model_len or model.cfg.max_position_embeddings,
                                   capture=cuda_graphs)

    async def _compute(self, fn, *args):
        if self._pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def prepare(self, scheduled: list[Scheduled], all_logits: bool = False) -> MicroBatch:
        tokens, positions, rows = [], [], []
        row = 0
        for s in scheduled:
            start = s.seq.num_computed
            tokens.extend(s.seq.token_ids[start:start + s.num_tokens])
            positions.extend(range(start, start + s.num_tokens))
            row += s.num_tokens
            if all_logits:
                rows.extend(range(row - s.num_tokens, row))
            elif s.samples:
                rows.append(row - 1)
        dev = self.model.device
        qlens, lens = [s.num_tokens for s in scheduled], [s.seq.num_computed + s.num_tokens for s in scheduled]
        tables = [s.seq.block_table for s in scheduled]
        graph = self.graphs.prepare(lens, tables) if self.graphs.active and max(qlens) == 1 else None
        # A graph batch carries its own layout; the eager one is built only when it runs.
        meta = None if graph is not None else AttentionMetadata.build(
            qlens, lens, tables, self.kv.block_size, dev, self.decode_kernel, self.prefill_kernel)
        return MicroBatch(torch.tensor(tokens, device=dev), torch.tensor(positions, dtype=torch.int64, device=dev),
                          meta, torch.tensor(rows, dtype=torch.int64, device=dev), graph=graph, upto=max(lens))

    def split(self, scheduled: list[Scheduled]) -> list[list[Scheduled]]:
        """Contiguous runs of sequences with about equal token counts, at most micro_batches of them."""
        m = min(self.micro_batches, len(scheduled))
        if m <= 1:
            return [scheduled]
        total = sum(s.num_tokens for s in scheduled)
        parts, cur, acc = [], [], 0
        for s in scheduled:
            cur.append(s)
            acc += s.num_tokens
            if acc >= total * (len(parts) + 1) / m and len(parts) < m - 1:
                parts.append(cur)
                cur = []
        return parts + [cur] if cur else parts

    def _attend(self, layer: int, x: torch.Tensor, rope: tuple, mb: MicroBatch):
        """Everything of a layer before the experts: attention, norm, routing, dispatch plan."""
        m = self.model
        if mb.graph is not None:
            h, y, ids, weights = self.graphs.run(layer, x, mb.graph)
        else:
            h = m.attention(layer, x, *rope, *self._kv_layers[layer], mb.meta)
            y = m.moe_input(layer, h)
            ids, weights = route(y, m.gate(layer), m.top_k)
        if self.on_route is not None:
            self.on_route(layer, ids)
        return h, y, plan(ids, weights, *self._groups[layer])

    async def forward(self, mb: MicroBatch, greedy: bool = False) -> torch.Tensor:
        """The layer loop for one micro-batch -> logits [len(logit_rows), V], or with greedy
        their argmax [len(logit_rows)] from the model's screen."""
        m = self.model
        x = m.embed(mb.tokens)
        rope = None if mb.graph is not None else m.rope(mb.positions, mb.upto)   # graphs compute their own
        for layer in range(len(m.layers)):
            h, y, batches = await self._compute(self._attend, layer, x, rope, mb)
            parts = await self.transport.forward(layer, y, batches)
            x = combine(parts, batches, h)
        return await self._compute(m.greedy if greedy else m.logits, x[mb.logit_rows])

    async def logits(self, scheduled: list[Scheduled], all_logits: bool = False, greedy: bool = False) -> torch.Tensor:
        mbs = [self.prepare(part, all_logits) for part in self.split(scheduled)]
        outs = await asyncio.gather(*(self.forward(mb, greedy) for mb in mbs))
        return torch.cat(outs)

    async def run(self, scheduled: list[Scheduled]) -> list[int | Failed | None]:
        """Compute a step; for each sequence that reaches its end a new token (or Failed, when
        its sampling raised), None for the rest."""
        if not scheduled:
            return []
        sampling = [s.seq for s in scheduled if s.samples]
        if self.model.greedy_head is not None and sampling and all(_plain_greedy(q) for q in sampling):
            # Only the argmax is wanted: no logits to mask, penalize, sample or score.
            it = iter((await self.logits(scheduled, greedy=True)).tolist())
            return [next(it) if s.samples else None for s in scheduled]
        masks = _start_masks(sampling, self.model.device)   # filled on a worker thread while the model runs
        logits = await self.logits(scheduled)                                    # [B, V]
        raw = logits
        if masks is not None:
            rows, future = masks
            if any(sampling[i].params.scored for i in rows):
                logits = logits.clone()            # logprobs are the model's own, not the mask's
            await asyncio.wrap_future(apply_masks(future, logits))
        try:
            picked = _sample(logits, sampling, raw)
        except Exception:
            # One request's parameters must not fail the others: sample row by row, and only
            # the rows that still raise fail.
            log.exception("sampling a batch of %d failed; sampling its rows one at a time", len(sampling))
            picked = [_sample_one(logits[i:i + 1], q, raw[i:i + 1]) for i, q in enumerate(sampling)]
        it = iter(picked)
        return [next(it) if s.samples else None for s in scheduled]


def _plain_greedy(q: Sequence) -> bool:
    p = q.params
    return p.greedy and not p.penalized and not p.scored and q.grammar is None


def _start_masks(seqs: list[Sequence], device: torch.device) -> tuple[list[int], Future] | None:
    """The rows of seqs with a grammar, and their TokenMask being filled (None: no row has one)."""
    rows = [i for i, q in enumerate(seqs) if q.grammar is not None]
    if not rows:
        return None
    return rows, start_masks([seqs[i].grammar for i in rows], rows, len(seqs), device)


def _sample(logits: torch.Tensor, seqs: list[Sequence], raw: torch.Tensor) -> list[int]:
    """logits [B, V] -> a token per sequence; logprobs (of raw, the unmasked logits) are
    recorded only once every row succeeded: the top ones where asked for, the sum of the
    sampled ones where the request ranks its candidates (best_of)."""
    params = [q.params for q in seqs]
    history = ([q.token_ids for q in seqs], [q.num_prompt_tokens for q in seqs]) if any(
        p.penalized for p in params) else (None, None)
    tokens = sample(logits, params, [q.seed for q in seqs], [q.num_output for q in seqs], *history)
    want = [i for i, q in enumerate(seqs) if q.params.scored]
    records = []
    if want:
        n = max(seqs[i].params.logprobs or 0 for i in want)
        chosen, ids, vals = top_logprobs(raw[want], tokens[want], n)
        for j, i in enumerate(want):
            k, lp = seqs[i].params.logprobs, float(chosen[j])
            records.append((seqs[i], lp, None if k is None else list(zip(ids[j, :k].tolist(), vals[j, :k].tolist()))))
    for q, lp, top in records:
        q.cumulative_logprob += lp
        if top is not None:
            q.logprobs.append((lp, top))
    return tokens.tolist()


def _sample_one(logits: torch.Tensor, seq: Sequence, raw: torch.Tensor) -> int | Failed:
    try:
        return _sample(logits, [seq], raw)[0]
    except Exception as e:
        log.warning("sampling failed for sequence %d: %s: %s", seq.seq_id, type(e).__name__, e)
        return Failed(f"sampling failed: {type(e).__name__}: {e}")
