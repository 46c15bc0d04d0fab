"""Continuous batching with chunked prefill. Plain Python.

Every step the scheduler hands out a token budget: first one token to each sequence
that is decoding, so streams keep flowing, then what is left to prompts in chunks, so a
64K-token prompt is fed in over many steps beside them. Sequences join the moment their
first chunk fits and leave the moment they finish. A joining sequence first takes the
cached blocks of its prompt's prefix (block_manager.py) and computes only what follows.

When the KV cache runs out, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed from its tokens so
far (what of them is still cached is taken back, not recomputed). Sampling depends only
on (seed, tokens so far), so the recompute gives the same tokens it would have.

A request for n choices (or best_of candidates) is admitted as its first choice alone. Once
that one has computed the prompt (the step that samples its first token), the others fork
from it: each takes its full prompt blocks by reference (block_manager.fork) and joins
the queue's front to compute only the last, partial block (at least the last prompt
token, whose logits give its first token). Forking after prefill rather than admitting
copies that hit the prefix cache works with prefix caching off, cannot lose the blocks to
eviction in between, and needs no copy of a half-written block nor n draws from one row of logits.
"""

from collections import deque
from dataclasses import dataclass

from attention_service.block_manager import BlockManager
from attention_service.errors import RequestError
from attention_service.sequence import Sequence, Status


@dataclass(frozen=True)
class Failed:
    """In place of a sampled token: this sequence's step could not be completed, and why."""

    error: str


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int          # tokens computed this step, from seq.num_computed on

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so its logits give a new token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_batched_tokens: int = 2048):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        # The last sampled token is never fed back, so it needs no slot.
        most = seq.num_prompt_tokens + seq.params.max_tokens - 1
        if most > self.blocks.capacity_tokens:
            raise RequestError(f"{seq.num_prompt_tokens} prompt tokens + max_tokens {seq.params.max_tokens} "
                               f"cannot fit in the KV cache ({self.blocks.capacity_tokens} token slots)", "max_tokens")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_batched_tokens
        out: list[Scheduled] = []
        preemptions_before = self.num_preemptions
        # Decoding sequences first, then the ones still feeding their prompt in.
        for seq in sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed > 1, s.arrival, s.seq_id)):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:      # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, n):
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            out.append(Scheduled(seq, n))
            budget -= n
        # A step that had to preempt admits nobody: the cache is full.
        admit = self.num_preemptions == preemptions_before
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Its cached (or forked) prefix comes for free: the budget pays for the rest.
            cached = max(seq.num_computed, len(self.blocks.cached_prefix(seq)) * self.blocks.block_size)
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_start(seq, n):
                break
            self.waiting.popleft()
            self.blocks.start(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Preempt the newest running sequences until seq can grow by n; False if seq itself went."""
        while not self.blocks.can_allocate(seq, seq.num_computed + n):
            victim = max((s for s in self.running if s.status is Status.RUNNING), key=lambda s: (s.arrival, s.seq_id))
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, scheduled: list[Scheduled], sampled: list[int | Failed | None],
                    eos_id: int) -> list[Sequence]:
        """Record a step's work and new tokens; returns the sequences that got a token or failed."""
        touched = []
        for s, tok in zip(scheduled, sampled):
            seq = s.seq
            if seq.is_finished:          # cancelled while its step was in flight
                continue
            seq.num_computed += s.num_tokens
            self.blocks.commit(seq)
            if tok is None:
                continue
            if isinstance(tok, Failed):
                seq.error = tok.error
                touched.append(seq)
                self.finish(seq, "error")
                continue
            seq.token_ids.append(tok)
            touched.append(seq)
            if seq.followers:
                self._fork(seq)
            p = seq.params
            if not p.ignore_eos and tok == eos_id:
                self.finish(seq, "stop")
            elif tok in p.stop_token_ids:
                self.finish(seq, "stop")
            elif seq.grammar is not None and seq.grammar.accept(tok):
                # Complete (nothing but a stop token may follow), or broken: a token the mask forbade.
                seq.error = seq.grammar.error
                self.finish(seq, "error" if seq.grammar.error else "stop")
            elif seq.num_output >= p.max_tokens:
                self.finish(seq, "length")
        return touched

    def _fork(self, seq: Sequence) -> None:
        """Start seq's other choices on its prompt's full blocks, ahead of the queue, in order."""
        shared = (seq.num_prompt_tokens - 1) // self.blocks.block_size
        for f in reversed(seq.followers):
            self.blocks.fork(seq, f, shared)
            self.waiting.appendleft(f)
        seq.followers = []

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq now (done, stopped or cancelled) and give its blocks back; choices still
        waiting to fork from it end the same way."""
        if seq.status is Status.FINISHED:
            return
        followers, seq.followers = seq.followers, []
        for f in followers:
            f.error = seq.error
            self.finish(f, reason)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
