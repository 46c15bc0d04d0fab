"""Scheduler: continuous batching, chunked prefill, preemption. Driven without a model.

`step()` below plays the engine: schedule, then "run the model" by handing back a fake
token for every Scheduled whose `.samples` is True (None for the others), then postprocess.
The fake token for a sequence is 1000 + (tokens it has generated so far), so it depends only
on the sequence's own history, like seeded sampling does: a recompute after preemption must
give back exactly the same outputs, and a lost or repeated position shows up in output_ids.
"""

import collections
import itertools
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_service.block_manager import BlockManager
from attention_service.sampling_params import SamplingParams
from attention_service.scheduler import Scheduled, Scheduler
from attention_service.sequence import Sequence, Status

EOS = 2
STOP = 77


def fake_token(seq: Sequence) -> int:
    return 1000 + seq.num_output


def expected_outputs(n: int) -> list[int]:
    return [1000 + i for i in range(n)]


@dataclass
class Ran:
    """What one Scheduled looked like before postprocess moved the sequence on."""
    seq: Sequence
    start: int
    n: int
    samples: bool


_prompts = itertools.count()


def req(prompt_len: int, max_tokens: int = 8, **params) -> Sequence:
    """A request whose prompt no other request shares (so no prefix is cached across them)."""
    params.setdefault("ignore_eos", False)
    first = 100 + 100_000 * next(_prompts)
    return Sequence(list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens, **params), seed=0)


def make(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, max_batched_tokens: int = 64,
         prefix_caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs=max_num_seqs,
                     max_batched_tokens=max_batched_tokens)


def check_invariants(sched: Scheduler) -> None:
    bm = sched.blocks
    running, waiting = sched.running, list(sched.waiting)
    assert len(running) <= sched.max_num_seqs
    assert len({id(s) for s in running + waiting}) == len(running) + len(waiting), "a sequence is queued twice"
    for s in running:
        assert s.status is Status.RUNNING
        # the table covers exactly the cached tokens, and something is always left to compute
        assert len(s.block_table) == math.ceil(s.num_computed / bm.block_size), s
        assert s.num_computed < s.num_tokens, s
    for s in waiting:
        assert s.status is Status.WAITING
        assert s.block_table == [] and s.num_computed == 0, s
    blocks_accounted(bm, running)


def blocks_accounted(bm: BlockManager, holders) -> None:
    """Every block is free, cached-and-free, or held, exactly one of them; a held block's count
    is the tables holding it; a block held twice is a named one, full of computed tokens of
    every holder; names and blocks map one to one."""
    held = collections.Counter(b for s in holders for b in s.block_table)
    free, cached = list(bm.free_blocks), list(bm.cached_free)
    assert len(free) == len(set(free)) and not set(free) & set(cached), "a block is free twice"
    assert sorted(list(held) + free + cached) == list(range(bm.num_blocks)), "blocks lost or duplicated"
    assert all(bm.ref_count[b] == n for b, n in held.items()), "reference count off"
    assert all(bm.ref_count[b] == 0 for b in free + cached)
    assert all(b in bm.hash_of for b in cached), "an unnamed block kept as cached"
    for s in holders:
        for i, b in enumerate(s.block_table):
            if held[b] > 1:
                assert b in bm.hash_of and (i + 1) * bm.block_size <= s.num_computed, "a shared block may be written"
    assert {h: b for b, h in bm.hash_of.items()} == bm.block_of


def step(sched: Scheduler, token=fake_token, check: bool = True) -> list[Ran]:
    scheduled = sched.schedule()
    ran = [Ran(s.seq, s.seq.num_computed, s.num_tokens, s.samples) for s in scheduled]
    sampled = [(token(r.seq) if callable(token) else token) if r.samples else None for r in ran]
    sched.postprocess(scheduled, sampled, EOS)
    if check:
        check_invariants(sched)
    return ran


def by_seq(ran: list[Ran]) -> dict[int, Ran]:
    return {r.seq.seq_id: r for r in ran}


def run_to_end(sched: Scheduler, max_steps: int = 10_000, token=fake_token) -> list[list[Ran]]:
    steps = []
    while sched.has_work:
        steps.append(step(sched, token))
        assert len(steps) < max_steps, "scheduler did not terminate"
    return steps


# --- join and leave ---------------------------------------------------------------------------

def test_request_joins_on_first_step_it_fits():
    sched = make()
    s = req(5)
    sched.add(s)
    assert s.status is Status.WAITING and list(sched.waiting) == [s]
    ran = step(sched)
    assert [(r.seq, r.start, r.n, r.samples) for r in ran] == [(s, 0, 5, True)]
    assert s.status is Status.RUNNING and sched.running == [s]
    assert s.num_computed == 5 and s.output_ids == [1000]


def test_request_leaves_the_step_it_finishes_and_frees_its_blocks_at_once():
    sched = make(num_blocks=16)
    s = req(6, max_tokens=3)
    sched.add(s)
    step(sched)
    step(sched)
    assert s.status is Status.RUNNING and sched.blocks.num_free < 16
    step(sched)
    assert s.status is Status.FINISHED and s.finish_reason == "length"
    assert s not in sched.running and s not in sched.waiting
    assert s.block_table == [] and sched.blocks.num_free == 16
    assert not sched.has_work
    assert sched.schedule() == []


def test_new_request_joins_a_running_batch_mid_stream():
    sched = make()
    a = req(4, max_tokens=10)
    sched.add(a)
    step(sched)
    step(sched)
    b = req(3, max_tokens=10)
    sched.add(b)
    ran = by_seq(step(sched))
    assert ran[a.seq_id].n == 1 and ran[a.seq_id].samples       # a keeps decoding
    assert ran[b.seq_id].start == 0 and ran[b.seq_id].n == 3 and ran[b.seq_id].samples
    assert sched.running == [a, b]


def test_finished_sequence_is_not_scheduled_again_while_others_continue():
    sched = make()
    short, long_ = req(3, max_tokens=1), req(3, max_tokens=5)
    sched.add(short)
    sched.add(long_)
    first = step(sched)
    assert {r.seq.seq_id for r in first} == {short.seq_id, long_.seq_id}
    assert short.status is Status.FINISHED and short.output_ids == [1000]
    for _ in range(4):
        assert [r.seq for r in step(sched)] == [long_]
    assert long_.is_finished and long_.output_ids == expected_outputs(5)


def test_postprocess_returns_only_sequences_that_got_a_token():
    sched = make(max_batched_tokens=6)
    a, b = req(3, max_tokens=5), req(10, max_tokens=5)
    sched.add(a)
    sched.add(b)
    scheduled = sched.schedule()
    assert [(s.seq, s.num_tokens, s.samples) for s in scheduled] == [(a, 3, True), (b, 3, False)]
    touched = sched.postprocess(scheduled, [fake_token(a), None], EOS)
    assert touched == [a]
    assert b.num_output == 0 and b.num_computed == 3


def test_has_work_follows_the_queues():
    sched = make()
    assert not sched.has_work
    s = req(2, max_tokens=2)
    sched.add(s)
    assert sched.has_work
    run_to_end(sched)
    assert not sched.has_work


# --- FCFS and max_num_seqs --------------------------------------------------------------------

def test_admission_is_first_come_first_served():
    sched = make(max_num_seqs=1)
    seqs = [req(n, max_tokens=2) for n in (7, 1, 4, 2, 9)]
    for s in seqs:
        sched.add(s)
    admitted = []
    for ran in run_to_end(sched):
        for r in ran:
            if r.start == 0 and r.seq not in admitted:
                admitted.append(r.seq)
    assert admitted == seqs
    assert all(s.output_ids == expected_outputs(2) for s in seqs)


def test_admission_in_one_step_takes_the_queue_in_order():
    sched = make(max_batched_tokens=100)
    seqs = [req(n) for n in (5, 3, 8)]
    for s in seqs:
        sched.add(s)
    assert [(r.seq, r.n) for r in step(sched)] == [(seqs[0], 5), (seqs[1], 3), (seqs[2], 8)]


def test_head_of_queue_that_does_not_fit_blocks_those_behind_it():
    sched = make(num_blocks=4, block_size=4)
    a = req(8, max_tokens=3)          # holds 2-3 blocks while running
    big, small = req(9, max_tokens=1), req(1, max_tokens=1)
    sched.add(a)
    step(sched)
    sched.add(big)
    sched.add(small)
    ran = step(sched)
    assert [r.seq for r in ran] == [a]                 # small would fit, but big is first in line
    assert list(sched.waiting) == [big, small]
    run_to_end(sched)
    assert big.is_finished and small.is_finished


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_max_num_seqs_caps_the_running_batch(cap):
    sched = make(max_num_seqs=cap, max_batched_tokens=1000)
    seqs = [req(3, max_tokens=4) for _ in range(7)]
    for s in seqs:
        sched.add(s)
    ran = step(sched)
    assert [r.seq for r in ran] == seqs[:cap]
    assert len(sched.running) == cap and list(sched.waiting) == seqs[cap:]
    while sched.has_work:
        step(sched)                                    # check_invariants asserts the cap every step
    assert all(s.output_ids == expected_outputs(4) for s in seqs)


def test_freed_slot_is_refilled_the_very_next_step():
    sched = make(max_num_seqs=2)
    a, b, c = req(2, max_tokens=2), req(2, max_tokens=5), req(2, max_tokens=5)
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    step(sched)                        # a finishes here
    assert a.is_finished and c.status is Status.WAITING
    ran = by_seq(step(sched))
    assert c.seq_id in ran and ran[c.seq_id].start == 0
    assert sched.running == [b, c]


# --- the token budget: decodes first, chunked prefill ----------------------------------------

def test_long_prompt_is_prefilled_in_chunks_and_samples_only_on_the_last():
    sched = make(max_batched_tokens=10)
    s = req(25, max_tokens=3)
    sched.add(s)
    chunks = [step(sched) for _ in range(3)]
    assert [(r.start, r.n, r.samples) for (r,) in chunks] == [(0, 10, False), (10, 10, False), (20, 5, True)]
    assert s.output_ids == [1000]
    assert [(r.start, r.n, r.samples) for (r,) in [step(sched)]] == [(25, 1, True)]


@pytest.mark.parametrize("budget,prompt", [(1, 5), (3, 10), (7, 7), (7, 8), (16, 100)])
def test_prefill_positions_never_skip_or_repeat(budget, prompt):
    sched = make(num_blocks=64, max_batched_tokens=budget)
    s = req(prompt, max_tokens=3)
    sched.add(s)
    pos = 0
    while sched.has_work:
        tokens_before = s.num_tokens
        (r,) = step(sched)
        assert r.start == pos and 1 <= r.n <= budget
        assert r.samples == (r.start + r.n == tokens_before)
        assert s.num_computed == pos + r.n                 # moves by exactly what was scheduled
        pos += r.n
    assert pos == prompt + 3 - 1                      # the last sampled token is never fed back
    assert s.output_ids == expected_outputs(3)


def test_chunk_takes_the_rest_of_the_budget_and_nobody_is_admitted_behind_it():
    sched = make(max_batched_tokens=10)
    p, q = req(25), req(3)
    sched.add(p)
    sched.add(q)
    assert [(r.seq, r.n) for r in step(sched)] == [(p, 10)]
    assert [(r.seq, r.n) for r in step(sched)] == [(p, 10)]
    assert [(r.seq, r.n, r.samples) for r in step(sched)] == [(p, 5, True), (q, 3, True)]


def test_leftover_budget_starts_a_partial_chunk_for_the_next_prompt():
    sched = make(max_batched_tokens=10)
    seqs = [req(3) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    ran = step(sched)
    assert [(r.seq, r.n, r.samples) for r in ran] == [(seqs[0], 3, True), (seqs[1], 3, True),
                                                        (seqs[2], 3, True), (seqs[3], 1, False)]
    assert sum(r.n for r in ran) == 10


def test_decodes_get_their_token_before_any_prefill_chunk():
    sched = make(num_blocks=128, max_batched_tokens=10)
    decoders = [req(2, max_tokens=50) for _ in range(3)]
    for d in decoders:
        sched.add(d)
    step(sched)
    long_ = req(40, max_tokens=2)
    sched.add(long_)
    for i in range(5):                                  # 40 tokens at 7 a step: 5 full chunks...
        ran = step(sched)
        assert [r.seq for r in ran[:3]] == decoders          # decodes come first...
        assert all(r.n == 1 and r.samples for r in ran[:3])  # ...with exactly one token each
        assert ran[3].seq is long_ and ran[3].start == 7 * i and ran[3].n == 7 and not ran[3].samples
        assert sum(r.n for r in ran) == 10
    ran = step(sched)                                   # ...and the last 5, which samples
    assert [r.n for r in ran] == [1, 1, 1, 5]
    assert ran[3].seq is long_ and ran[3].start == 35 and ran[3].samples
    assert long_.output_ids == [1000]


def test_a_long_prefill_never_stalls_other_streams():
    sched = make(num_blocks=256, block_size=8, max_batched_tokens=16)
    decoders = [req(3, max_tokens=60) for _ in range(4)]
    for d in decoders:
        sched.add(d)
    step(sched)
    huge = req(500, max_tokens=1)
    sched.add(huge)
    steps = 0
    while not huge.is_finished:
        outs = [d.num_output for d in decoders]
        step(sched)
        steps += 1
        assert [d.num_output for d in decoders] == [o + 1 for o in outs], "a decode was stalled by a prefill"
    assert steps == math.ceil(500 / 12)
    assert all(d.output_ids == expected_outputs(d.num_output) for d in decoders)


def test_running_prefill_gets_budget_before_new_requests():
    sched = make(max_batched_tokens=8)
    p = req(20, max_tokens=2)
    sched.add(p)
    step(sched)
    q = req(2, max_tokens=2)
    sched.add(q)
    assert [(r.seq, r.n) for r in step(sched)] == [(p, 8)]
    assert q.status is Status.WAITING


def test_budget_lowered_below_the_batch_serves_oldest_first_and_never_overspends():
    sched = make(max_batched_tokens=64)
    seqs = [req(2, max_tokens=6) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched)
    sched.max_batched_tokens = 2          # read afresh every step
    ran = step(sched)
    assert [(r.seq, r.n) for r in ran] == [(seqs[0], 1), (seqs[1], 1)]   # no zero-token entries
    assert seqs[2].num_computed == 2 and seqs[2].status is Status.RUNNING
    sched.max_batched_tokens = 64
    run_to_end(sched)
    assert all(s.output_ids == expected_outputs(6) for s in seqs)


def test_scheduled_samples_is_true_exactly_when_the_step_reaches_the_last_token():
    s = req(10)
    assert not Scheduled(s, 9).samples
    assert Scheduled(s, 10).samples
    s.num_computed = 4
    assert Scheduled(s, 6).samples and not Scheduled(s, 5).samples


# --- out of blocks ----------------------------------------------------------------------------

def test_new_request_waits_while_the_cache_is_full_and_joins_when_blocks_free():
    sched = make(num_blocks=4, block_size=4)
    a = req(10, max_tokens=4)          # grows to 13 cached tokens: all 4 blocks
    b = req(8, max_tokens=2)
    sched.add(a)
    sched.add(b)
    while not a.is_finished:
        ran = step(sched)
        assert b.status is Status.WAITING and b.block_table == []
        assert [r.seq for r in ran] == [a]
    assert sched.blocks.num_free == 4
    ran = step(sched)
    assert [(r.seq, r.start, r.n) for r in ran] == [(b, 0, 8)]
    run_to_end(sched)
    assert b.output_ids == expected_outputs(2) and sched.num_preemptions == 0


def test_many_requests_on_a_tiny_cache_all_finish():
    sched = make(num_blocks=3, block_size=2, max_batched_tokens=4)
    seqs = [req(n, max_tokens=m) for n, m in [(3, 3), (5, 2), (1, 6), (2, 2), (4, 3)]]
    for s in seqs:
        sched.add(s)
    run_to_end(sched)
    for s in seqs:
        assert s.finish_reason == "length" and s.output_ids == expected_outputs(s.params.max_tokens)
    assert sched.blocks.num_free == 3


# --- preemption -------------------------------------------------------------------------------

def _three_full(max_tokens: tuple[int, int, int] = (8, 8, 8), budget: int = 64, prefix_caching: bool = True):
    """A, B, C prefilled into a 5-block cache (1 + 2 + 2 blocks of 4): nothing free."""
    sched = make(num_blocks=5, block_size=4, max_batched_tokens=budget, prefix_caching=prefix_caching)
    a, b, c = req(4, max_tokens[0]), req(5, max_tokens[1]), req(6, max_tokens[2])
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    assert sched.blocks.num_free == 0 and sched.running == [a, b, c]
    return sched, a, b, c


def test_cannot_grow_preempts_the_newest_running_sequence():
    sched, a, b, c = _three_full()
    c_tokens, c_prompt = list(c.token_ids), c.token_ids[:6]
    ran = step(sched)                    # a needs a 2nd block for its 5th token: c must go
    assert [r.seq for r in ran] == [a, b]
    assert sched.num_preemptions == 1
    assert sched.running == [a, b] and list(sched.waiting) == [c]
    assert c.status is Status.WAITING and c.num_computed == 0 and c.block_table == []
    assert c.token_ids == c_tokens and c.output_ids == [1000]      # prompt + generated so far, intact
    assert c.token_ids[:6] == c_prompt


def test_preempted_sequence_goes_to_the_front_of_the_queue():
    sched, a, b, c = _three_full()
    d = req(1)
    sched.add(d)
    step(sched)
    assert list(sched.waiting) == [c, d]


def test_a_step_that_preempted_admits_nobody():
    sched, a, b, c = _three_full(prefix_caching=False)
    # with 1 token of budget left after the two decodes, c's first recompute chunk would fit
    # in the one block left free after a grows; the step that preempted must still admit nobody
    sched.max_batched_tokens = 3
    ran = step(sched)
    assert [r.seq for r in ran] == [a, b] and sched.blocks.num_free == 1
    assert c.status is Status.WAITING
    ran = by_seq(step(sched))           # next step: room and budget, so c is back
    assert ran[c.seq_id].start == 0 and ran[c.seq_id].n == 1


def test_preempted_sequence_is_recomputed_from_scratch_and_continues():
    sched, a, b, c = _three_full(max_tokens=(2, 3, 5), prefix_caching=False)
    step(sched)                          # c preempted; a finishes
    assert c.status is Status.WAITING and a.is_finished
    ran = by_seq(step(sched))
    r = ran[c.seq_id]
    assert (r.start, r.n, r.samples) == (0, 7, True)      # all 7 tokens (6 prompt + 1 out) again
    assert c.output_ids == [1000, 1001]
    run_to_end(sched)
    assert c.output_ids == expected_outputs(5) and c.finish_reason == "length"
    assert b.output_ids == expected_outputs(3)
    assert sched.blocks.num_free == 5


def test_preempted_sequence_restarts_from_its_cached_blocks():
    sched, a, b, c = _three_full(max_tokens=(2, 3, 5))
    step(sched)                          # c preempted (its full first block stays cached); a finishes
    assert c.status is Status.WAITING and a.is_finished and c.block_table == []
    ran = by_seq(step(sched))
    r = ran[c.seq_id]
    assert (r.start, r.n, r.samples) == (4, 3, True)      # the cached block back, tokens 4-6 computed
    assert sched.blocks.stats.hit_blocks == 1
    run_to_end(sched)
    assert c.output_ids == expected_outputs(5) and b.output_ids == expected_outputs(3)
    assert sched.blocks.num_free == 5


def test_oldest_sequence_is_never_preempted_and_everyone_finishes():
    sched = make(num_blocks=6, block_size=2, max_batched_tokens=32)
    seqs = [req(3, max_tokens=8) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    while not seqs[0].is_finished:
        before = seqs[0].num_computed
        ran = by_seq(step(sched))
        assert seqs[0].status is not Status.WAITING
        assert ran[seqs[0].seq_id].start == before              # never sent back to position 0
    run_to_end(sched)
    assert sched.num_preemptions > 0
    assert all(s.output_ids == expected_outputs(8) for s in seqs)
    assert sched.blocks.num_free == 6


def test_sequence_that_is_itself_newest_preempts_itself_and_the_rest_go_on():
    sched = make(num_blocks=3, block_size=2)
    a, b = req(2, max_tokens=4), req(2, max_tokens=4)
    sched.add(a)
    sched.add(b)
    step(sched)                          # a: 1 block, b: 1 block, 1 free
    ran = step(sched)                    # a takes the free block; b cannot grow, is newest: b goes
    assert [r.seq for r in ran] == [a]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.output_ids == [1000]
    run_to_end(sched)
    assert a.output_ids == expected_outputs(4) and b.output_ids == expected_outputs(4)


def test_preempting_several_keeps_the_queue_in_arrival_order():
    sched = make(num_blocks=4, block_size=2, max_batched_tokens=64)
    seqs = [req(2, max_tokens=6) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    step(sched)                           # four 2-token prompts fill all four blocks
    step(sched)                           # everyone needs a second block
    assert sched.running == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    assert sched.num_preemptions == 2


def test_preemption_of_a_partly_prefilled_sequence_restarts_its_prompt():
    sched = make(num_blocks=4, block_size=2, max_batched_tokens=4)
    a = req(3, max_tokens=5)             # up to 7 cached tokens of 8
    p = req(6, max_tokens=1)
    p_prompt = list(p.token_ids)
    sched.add(a)
    sched.add(p)
    assert [(r.seq, r.start, r.n) for r in step(sched)] == [(a, 0, 3), (p, 0, 1)]
    assert [(r.seq, r.start, r.n) for r in step(sched)] == [(a, 3, 1), (p, 1, 3)]
    assert sched.blocks.num_free == 0
    assert [r.seq for r in step(sched)] == [a]        # a needs a 3rd block: p (4 of 6 in) goes
    assert p.status is Status.WAITING and p.num_computed == 0 and p.output_ids == []
    assert p.token_ids == p_prompt
    while not a.is_finished:                         # a's growth evicts p's cached blocks, leaves first
        assert [r.seq for r in step(sched)] == [a]
    assert [(r.seq, r.start, r.n, r.samples) for r in step(sched)] == [(p, 0, 4, False)]
    assert [(r.seq, r.start, r.n, r.samples) for r in step(sched)] == [(p, 4, 2, True)]
    assert p.output_ids == [1000] and a.output_ids == expected_outputs(5)


# Two sequences with the same arrival stamp (same clock tick): the victim must be the newer
# by id, never one already scheduled earlier in the same step (that would hand the runner a
# sequence without blocks and lose its computed position).
def test_tied_arrival_never_preempts_a_sequence_already_scheduled_this_step():
    sched = make(num_blocks=3, block_size=2)
    a, b = req(2, max_tokens=4), req(2, max_tokens=4)
    b.arrival = a.arrival                 # created in the same clock tick
    sched.add(a)
    sched.add(b)
    step(sched)                           # a, b hold 1 block each, 1 free
    scheduled = sched.schedule()          # a takes the last block; b cannot grow
    for s in scheduled:
        assert s.seq.status is Status.RUNNING, f"{s.seq} was scheduled and then preempted in the same step"
    assert b.status is Status.WAITING and a.status is Status.RUNNING   # b came later: it is the newest


# --- cancellation ---------------------------------------------------------------------------

def test_abort_a_waiting_request():
    sched = make(max_num_seqs=1)
    a, b = req(3, max_tokens=3), req(3, max_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(b, "abort")
    assert b.status is Status.FINISHED and b.finish_reason == "abort"
    assert b not in sched.waiting
    steps = run_to_end(sched)
    assert all(r.seq is a for ran in steps for r in ran)
    assert b.output_ids == []


def test_abort_a_running_request_frees_its_blocks_at_once():
    sched = make(num_blocks=10, block_size=4)
    a, b = req(9, max_tokens=10), req(3, max_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.blocks.num_free == 10 - 3 - 1
    sched.finish(a, "abort")
    assert a.block_table == [] and sched.blocks.num_free == 9
    assert a not in sched.running and a.finish_reason == "abort"
    check_invariants(sched)
    assert [r.seq for r in step(sched)] == [b]


def test_abort_a_preempted_request():
    sched, a, b, c = _three_full()
    step(sched)
    assert c.status is Status.WAITING
    sched.finish(c, "abort")
    assert c.is_finished and c.finish_reason == "abort" and c not in sched.waiting
    check_invariants(sched)
    run_to_end(sched)
    assert sched.blocks.num_free == 5


def test_abort_mid_prefill_frees_blocks_and_lets_the_queue_move():
    sched = make(num_blocks=4, block_size=4, max_batched_tokens=4)
    p, q = req(12, max_tokens=2), req(12, max_tokens=2)
    sched.add(p)
    sched.add(q)
    step(sched)
    step(sched)
    sched.finish(p, "abort")
    assert sched.blocks.num_free == 4
    ran = step(sched)
    assert [(r.seq, r.start) for r in ran] == [(q, 0)]


def test_finish_is_idempotent_and_keeps_the_first_reason():
    sched = make()
    s = req(2, max_tokens=1)
    sched.add(s)
    step(sched)
    assert s.finish_reason == "length"
    sched.finish(s, "abort")
    assert s.finish_reason == "length"
    sched.finish(s, "abort")
    assert sched.blocks.num_free == 64


def test_abort_between_schedule_and_postprocess_does_not_resurrect_the_sequence():
    sched = make(num_blocks=8)
    a, b = req(4, max_tokens=10), req(4, max_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched)
    scheduled = sched.schedule()
    assert [s.seq for s in scheduled] == [a, b]
    sched.finish(a, "abort")             # the client hangs up while the step runs
    touched = sched.postprocess(scheduled, [fake_token(s.seq) for s in scheduled], EOS)
    assert touched == [b]                 # no token reported for, or appended to, the aborted one
    assert a.output_ids == [1000] and a.num_computed == 4
    assert a.is_finished and a.finish_reason == "abort"
    assert a not in sched.running and a not in sched.waiting and a.block_table == []
    check_invariants(sched)
    assert [r.seq for r in step(sched)] == [b]


# --- finish reasons ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_length_at_max_tokens(max_tokens):
    sched = make()
    s = req(3, max_tokens=max_tokens)
    sched.add(s)
    steps = run_to_end(sched)
    assert len(steps) == max_tokens
    assert s.finish_reason == "length" and s.num_output == max_tokens


def test_eos_stops_the_sequence():
    sched = make()
    s = req(3, max_tokens=10)
    sched.add(s)
    step(sched)
    step(sched, token=EOS)
    assert s.is_finished and s.finish_reason == "stop"
    assert s.output_ids == [1000, EOS] and sched.blocks.num_free == 64


def test_eos_is_ignored_with_ignore_eos():
    sched = make()
    s = req(3, max_tokens=4, ignore_eos=True)
    sched.add(s)
    for _ in range(3):
        step(sched, token=EOS)
        assert s.status is Status.RUNNING
    step(sched, token=EOS)
    assert s.finish_reason == "length" and s.output_ids == [EOS] * 4


def test_eos_on_the_last_allowed_token_reports_stop():
    sched = make()
    s = req(3, max_tokens=2)
    sched.add(s)
    step(sched)
    step(sched, token=EOS)
    assert s.finish_reason == "stop"


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_stop_token_ids_stop_even_with_ignore_eos(ignore_eos):
    sched = make()
    s = req(3, max_tokens=10, stop_token_ids=[STOP, 78], ignore_eos=ignore_eos)
    sched.add(s)
    step(sched)
    assert s.status is Status.RUNNING
    step(sched, token=78)
    assert s.finish_reason == "stop" and s.output_ids == [1000, 78]


def test_eos_during_a_prefill_chunk_is_never_seen():
    """Only the last chunk samples, so a stop cannot be triggered by a chunk in the middle."""
    sched = make(max_batched_tokens=4)
    s = req(10, max_tokens=3)
    sched.add(s)
    step(sched, token=EOS)
    step(sched, token=EOS)
    assert s.status is Status.RUNNING and s.num_output == 0
    step(sched, token=EOS)
    assert s.finish_reason == "stop"


def test_finishing_in_the_same_step_as_the_prompt():
    sched = make(num_blocks=4)
    s = req(5, max_tokens=1)
    sched.add(s)
    (r,) = step(sched)
    assert r.samples and s.finish_reason == "length" and sched.blocks.num_free == 4


# --- add --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,max_tokens", [(8, 2), (9, 1), (100, 1), (100, 16)])
def test_add_refuses_a_prompt_that_cannot_fit_in_the_whole_cache(prompt, max_tokens):
    sched = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError):
        sched.add(req(prompt, max_tokens=max_tokens))
    assert not sched.has_work


def test_add_accepts_what_fits_exactly_and_it_runs():
    sched = make(num_blocks=2, block_size=4)
    s = req(4, max_tokens=5)             # at most 4 + 5 - 1 = 8 cached tokens: the whole cache
    sched.add(s)
    run_to_end(sched, max_steps=50)
    assert s.output_ids == expected_outputs(5)


# A request whose generation would outgrow the whole cache must be refused at add():
# accepted, it would preempt itself forever once alone (has_work True, schedule() empty).
def test_add_refuses_a_request_whose_generation_cannot_fit():
    sched = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError):
        sched.add(req(4, max_tokens=10))   # needs 4 + 10 - 1 = 13 slots of 8


# --- properties -------------------------------------------------------------------------------

@st.composite
def workloads(draw):
    block_size = draw(st.integers(1, 6))
    num_blocks = draw(st.integers(1, 12))
    cap = block_size * num_blocks
    n = draw(st.integers(1, 8))
    reqs = []
    for _ in range(n):
        prompt = draw(st.integers(1, max(1, min(cap - 1, 30))))
        if prompt + 1 > cap:
            continue
        # at most prompt + max_tokens - 1 tokens are ever cached: allow exactly filling the cache
        max_tokens = draw(st.integers(1, min(cap - prompt + 1, 12)))
        arrive = draw(st.integers(0, 12))
        # Requests of one family share their first `shared` prompt tokens: cached prefixes.
        family, shared = draw(st.integers(0, 2)), draw(st.integers(0, prompt))
        reqs.append((arrive, prompt, max_tokens, family, shared))
    return dict(block_size=block_size, num_blocks=num_blocks,
                max_num_seqs=draw(st.integers(1, 5)), max_batched_tokens=draw(st.integers(1, 24)),
                prefix_caching=draw(st.booleans()), reqs=reqs)


def prompt_of(i: int, prompt: int, family: int, shared: int) -> list[int]:
    head = [10_000 * (family + 1) + t for t in range(shared)]
    return head + [1_000_000 * (i + 1) + t for t in range(prompt - shared)]


def _simulate(w, aborts=()):
    sched = make(w["num_blocks"], w["block_size"], w["max_num_seqs"], w["max_batched_tokens"], w["prefix_caching"])
    pending = sorted(enumerate(w["reqs"]), key=lambda x: x[1][0])
    seqs: dict[int, Sequence] = {}
    next_pos: dict[int, int] = {}
    aborts = dict(aborts)                 # step -> index of the request to abort
    t = 0
    while pending or sched.has_work:
        while pending and pending[0][1][0] <= t:
            i, (_, prompt, max_tokens, family, shared) = pending.pop(0)
            s = Sequence(prompt_of(i, prompt, family, shared), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                         seed=0)
            sched.add(s)
            seqs[i] = s
            next_pos[s.seq_id] = 0
        if t in aborts and aborts[t] in seqs:
            victim = seqs[aborts[t]]
            sched.finish(victim, "abort")
            assert victim.block_table == []
            check_invariants(sched)
        had_work = sched.has_work
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        decoders = [s for s in running_before if s.num_tokens - s.num_computed == 1]
        pre_before = sched.num_preemptions
        bs = sched.blocks.block_size
        cached = {s.seq_id: len(sched.blocks.cached_prefix(s)) * bs for s in waiting_before}

        scheduled = sched.schedule()
        ran = [Ran(x.seq, x.seq.num_computed, x.num_tokens, x.samples) for x in scheduled]

        # the budget, and something always moves while there is work
        assert sum(r.n for r in ran) <= sched.max_batched_tokens
        assert all(r.n >= 1 for r in ran)
        if had_work:
            assert ran, "a step with work scheduled nothing"
        assert len({r.seq.seq_id for r in ran}) == len(ran)
        for r in ran:
            assert r.seq.status is Status.RUNNING
            if r.seq in waiting_before:
                # a joining sequence starts on its cached prefix: whole blocks, at most what was cached
                assert r.start % bs == 0 and r.start <= cached[r.seq.seq_id] < r.seq.num_tokens
                assert w["prefix_caching"] or r.start == 0
            else:
                assert r.start == next_pos[r.seq.seq_id], "positions skipped or repeated"
            assert r.samples == (r.start + r.n == r.seq.num_tokens)
            assert len(r.seq.block_table) * sched.blocks.block_size >= r.start + r.n
        # decodes first: if any prompt chunk got budget, every decoder still running got 1 token
        if any(r.seq.num_tokens - r.start > 1 for r in ran):
            got = {r.seq.seq_id: r.n for r in ran}
            for d in decoders:
                if d.status is Status.RUNNING:
                    assert got.get(d.seq_id) == 1
        # nobody who stays running is skipped: every step moves every running sequence
        scheduled_ids = {r.seq.seq_id for r in ran}
        for x in running_before:
            if x.status is Status.RUNNING:
                assert x.seq_id in scheduled_ids, f"{x} was left out of a step"
        # admission is FCFS: the newly running are a prefix of the queue, in order
        admitted = [s for s in sched.running if s not in running_before]
        assert admitted == waiting_before[:len(admitted)]
        # preemption: victims are the newest, and a preempting step admits nobody
        preempted = [s for s in running_before if s.status is Status.WAITING]
        assert len(preempted) == sched.num_preemptions - pre_before
        if preempted:
            assert not admitted
            survivors = [s for s in running_before if s.status is Status.RUNNING]
            assert all(p.arrival > s.arrival for p in preempted for s in survivors)
            assert list(sched.waiting)[:len(preempted)] == sorted(preempted, key=lambda s: s.arrival)

        sched.postprocess(scheduled, [fake_token(r.seq) if r.samples else None for r in ran], EOS)
        for r in ran:
            next_pos[r.seq.seq_id] = r.start + r.n
        check_invariants(sched)
        t += 1
        assert t < 20_000, "simulation did not terminate"
    return sched, seqs


@settings(max_examples=400, deadline=None)
@given(w=workloads())
def test_random_workloads_always_finish_with_every_block_back(w):
    sched, seqs = _simulate(w)
    for i, (_, prompt, max_tokens, family, shared) in enumerate(w["reqs"]):
        s = seqs[i]
        assert s.is_finished and s.finish_reason == "length"
        assert s.num_output == max_tokens and s.output_ids == expected_outputs(max_tokens)
        assert s.token_ids[:prompt] == prompt_of(i, prompt, family, shared)
        assert s.block_table == []
    assert sched.blocks.num_free == w["num_blocks"]
    assert not sched.running and not sched.waiting


@settings(max_examples=100, deadline=None)
@given(w=workloads(), data=st.data())
def test_random_workloads_with_aborts_finish_with_every_block_back(w, data):
    n = len(w["reqs"])
    aborts = data.draw(st.dictionaries(st.integers(0, 40), st.integers(0, max(0, n - 1)), max_size=3)) if n else {}
    sched, seqs = _simulate(w, aborts.items())
    for i, (_, prompt, max_tokens, _family, _shared) in enumerate(w["reqs"]):
        s = seqs[i]
        assert s.is_finished and s.block_table == []
        if s.finish_reason == "length":
            assert s.output_ids == expected_outputs(max_tokens)
        else:
            assert s.finish_reason == "abort" and s.output_ids == expected_outputs(s.num_output)
    assert sched.blocks.num_free == w["num_blocks"]
