"""The attention shard's engine: requests in, tokens out, one step at a time.

    scheduled = scheduler.schedule()          which sequences run, how many tokens each
    sampled   = await runner.run(scheduled)   the layer loop, experts included, and sampling
    scheduler.postprocess(scheduled, sampled) record tokens, finish what is done
"""

import contextlib
import logging

import torch
from opentelemetry import trace

from attention_service.block_manager import BlockManager, PrefixCacheStats
from attention_service.config import EngineConfig
from attention_service.errors import ExpertGroupUnavailable, RequestError
from attention_service.grammar import Grammars
from attention_service.kv_cache import KVCache
from attention_service.model import AttentionModel
from attention_service.model_runner import ModelRunner
from attention_service.sampling_params import SamplingParams, check_prompt
from attention_service.scheduler import Scheduled, Scheduler
from attention_service.sequence import Sequence
from attention_service.transport import ExpertTransport
from router.dispatch import Placement
from router.routing_stats import RoutingStats

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

_CPU_KV_BYTES = 512 * 2**20


class Engine:
    def __init__(self, model: AttentionModel, transport: ExpertTransport, placement: Placement,
                 cfg: EngineConfig = EngineConfig(), eos_id: int = 2):
        self.model, self.cfg, self.eos_id, self.transport = model, cfg, eos_id, transport
        mc = model.cfg
        self.max_model_len = cfg.max_model_len_for(mc)
        budget = cfg.kv_cache_bytes or _default_kv_budget(model.device, cfg.kv_cache_fraction)
        self.kv = KVCache.from_budget(budget, cfg.block_size, mc.num_hidden_layers, model.n_kv_heads,
                                      model.dim_head, model.dtype, model.device)
        self.blocks = BlockManager(self.kv.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_batched_tokens)
        self.runner = ModelRunner(model, self.kv, transport, placement, cfg.micro_batches, cfg.cuda_graphs,
                                  self.max_model_len, cfg.greedy_screen)
        self.routing = RoutingStats(placement.group_of)
        self.runner.on_route = self.routing.add
        # Compiles and matches constrained outputs; needs the tokenizer, so open_engine sets it.
        self.grammars: Grammars | None = None

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse, before any work, what cannot run: bad prompts, too long a context, too small a cache."""
        positions = check_prompt(prompt_ids, params, self.model.cfg.vocab_size, self.max_model_len)
        if positions > self.blocks.capacity_tokens:
            raise RequestError(f"prompt + max_tokens needs {positions} tokens of KV cache; it holds "
                               f"{self.blocks.capacity_tokens}", "max_tokens")

    def add(self, prompt_ids: list[int], params: SamplingParams, trace_context=None) -> Sequence:
        """The request's first choice; all n (best_of, when more) are its `.choices`.
        trace_context: the request's OpenTelemetry context, for the steps that serve it."""
        self.check_request(prompt_ids, params)
        seq = Sequence(prompt_ids, params)
        seq.followers = [Sequence(prompt_ids, params, index=i) for i in range(1, params.candidates)]
        seq.choices += seq.followers
        if params.grammar is not None:
            if self.grammars is None:
                raise RequestError("this engine has no tokenizer for constrained output", params.grammar.param)
            for s in seq.choices:          # a matcher per choice: each walks its own output
                s.grammar = self.grammars.matcher(params.grammar)
        # Kept only when the request is sampled, so a step looks at no context of an untraced one.
        if trace_context is not None and trace.get_current_span(trace_context).get_span_context().trace_flags.sampled:
            for s in seq.choices:
                s.trace_context = trace_context
        self.scheduler.add(seq)
        return seq

    def finish(self, seq: Sequence, reason: str = "abort") -> None:
        """End seq now (stopped, cancelled, failed) and give its blocks back."""
        self.scheduler.finish(seq, reason)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV cache blocks in use."""
        return self.blocks.usage

    @property
    def prefix_stats(self) -> PrefixCacheStats:
        """Prefix cache lookups, hits and evictions so far."""
        return self.blocks.stats

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def blocks_all_free(self) -> bool:
        return self.blocks.num_free == self.blocks.num_blocks

    async def close(self) -> None:
        """Release the expert transport (its channels)."""
        await self.transport.close()

    async def step(self) -> list[Sequence]:
        scheduled = self.scheduler.schedule()
        try:
            with self._step_span(scheduled):
                sampled = await self.runner.run(scheduled)
        except ExpertGroupUnavailable:
            raise                  # nothing is wrong with the requests: the caller waits and steps again
        except Exception as e:     # a step that cannot be computed fails the sequences it held, no others
            log.exception("engine step failed; failing its %d sequences", len(scheduled))
            return self._fail([s.seq for s in scheduled], f"{type(e).__name__}: {e}")
        return self.scheduler.postprocess(scheduled, sampled, self.eos_id)

    def _fail(self, seqs: list[Sequence], error: str) -> list[Sequence]:
        for seq in seqs:
            seq.error = error
            self.scheduler.finish(seq, "error")
        return seqs

    def _step_span(self, scheduled: list[Scheduled]):
        """A step serves many requests but a span has one parent: the first traced request in
        it is the parent, the others are linked. Untraced steps cost nothing."""
        traced = [s.seq.trace_context for s in scheduled if s.seq.trace_context is not None]
        if not traced:
            return contextlib.nullcontext()
        links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in traced[1:]]
        return _tracer.start_as_current_span(
            "moe_serve.engine.step", context=traced[0], links=links,
            attributes={"moe_serve.sequences": len(scheduled),
                        "moe_serve.tokens": sum(s.num_tokens for s in scheduled)})

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Offline batch generation: run every prompt to completion; its choices in order (all
        best_of candidates, unranked: ranking is the async engine's)."""
        seqs = [c for p in prompts for c in self.add(p, params).choices]
        while self.has_work:
            await self.step()
        return seqs

    async def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits [L_i, V] at every position of each prompt, in one forward (for scoring and tests)."""
        seqs = [Sequence(p, SamplingParams(max_tokens=1)) for p in prompts]
        for s in seqs:
            self.blocks.allocate(s, s.num_tokens)
        try:
            logits = await self.runner.logits([Scheduled(s, s.num_tokens) for s in seqs], all_logits=True)
        finally:
            for s in seqs:
                self.blocks.free(s)
        return list(logits.split([len(p) for p in prompts]))


def _default_kv_budget(device: torch.device, fraction: float) -> int:
    if device.type != "cuda":
        return _CPU_KV_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * fraction)
