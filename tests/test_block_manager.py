"""BlockManager: the KV cache's free list and per-sequence block tables. No model, no torch."""

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from attention_service.block_manager import BlockManager
from attention_service.sampling_params import SamplingParams
from attention_service.sequence import Sequence


def seq(n: int = 1) -> Sequence:
    return Sequence(list(range(3, 3 + n)), SamplingParams(), seed=0)


def all_blocks_accounted(bm: BlockManager, seqs) -> None:
    """Every block is either free or in exactly one table; none twice, none lost, none invented."""
    owned = [b for s in seqs for b in s.block_table]
    free = list(bm.free_blocks)
    assert len(owned) == len(set(owned)), f"a block is in two tables: {owned}"
    assert len(free) == len(set(free)), f"a block is free twice: {free}"
    assert not set(owned) & set(free), "a block is both owned and free"
    assert sorted(owned + free) == list(range(bm.num_blocks))


# --- construction ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_blocks,block_size", [(0, 16), (16, 0), (-1, 4), (4, -1), (0, 0)])
def test_rejects_empty_cache_or_block(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_fresh_manager_is_all_free():
    bm = BlockManager(10, 16)
    assert bm.num_free == 10
    assert bm.usage == 0.0
    assert bm.capacity_tokens == 160
    assert sorted(bm.free_blocks) == list(range(10))


def test_single_slot_cache_works():
    bm = BlockManager(1, 1)
    s = seq()
    assert bm.can_allocate(s, 1) and not bm.can_allocate(s, 2)
    bm.allocate(s, 1)
    assert s.block_table == [0] and bm.num_free == 0 and bm.usage == 1.0


# --- allocation sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 48])
def test_allocates_ceil_n_over_block_size(block_size, n):
    bm = BlockManager(64, block_size)
    s = seq(n)
    assert bm.blocks_needed(s, n) == math.ceil(n / block_size)
    bm.allocate(s, n)
    assert len(s.block_table) == math.ceil(n / block_size)
    assert bm.num_free == 64 - math.ceil(n / block_size)


def test_zero_tokens_need_no_blocks():
    bm = BlockManager(4, 4)
    s = seq()
    assert bm.blocks_needed(s, 0) == 0
    bm.allocate(s, 0)
    assert s.block_table == [] and bm.num_free == 4


@pytest.mark.parametrize("block_size", [1, 2, 4, 7])
def test_grows_by_one_block_exactly_at_block_boundaries(block_size):
    bm = BlockManager(32, block_size)
    s = seq()
    for n in range(1, 4 * block_size + 2):
        before = len(s.block_table)
        bm.allocate(s, n)
        grew = len(s.block_table) - before
        # token n (1-based) opens a new block exactly when it is the first slot of one
        assert grew == (1 if (n - 1) % block_size == 0 else 0), (n, grew)
        assert len(s.block_table) == math.ceil(n / block_size)


def test_growth_keeps_existing_table_as_prefix():
    """Paged attention indexes slot i by table[i // block_size]: earlier entries must never move."""
    bm = BlockManager(16, 4)
    s = seq()
    bm.allocate(s, 5)
    head = list(s.block_table)
    bm.allocate(s, 13)
    assert s.block_table[:len(head)] == head
    assert len(s.block_table) == 4


def test_blocks_needed_counts_only_the_extra_blocks():
    bm = BlockManager(16, 4)
    s = seq()
    bm.allocate(s, 6)                            # 2 blocks
    assert bm.blocks_needed(s, 6) == 0
    assert bm.blocks_needed(s, 8) == 0
    assert bm.blocks_needed(s, 9) == 1
    assert bm.blocks_needed(s, 17) == 3
    assert bm.blocks_needed(s, 1) == 0           # never negative


def test_allocating_fewer_tokens_than_held_is_a_noop():
    bm = BlockManager(8, 4)
    s = seq()
    bm.allocate(s, 12)
    table = list(s.block_table)
    bm.allocate(s, 3)
    assert s.block_table == table and bm.num_free == 5


def test_blocks_come_from_free_list_and_are_distinct():
    bm = BlockManager(8, 2)
    a, b = seq(), seq()
    bm.allocate(a, 5)
    bm.allocate(b, 6)
    assert len(set(a.block_table + b.block_table)) == 6
    assert all(0 <= x < 8 for x in a.block_table + b.block_table)
    all_blocks_accounted(bm, [a, b])


# --- can_allocate and over-allocation ---------------------------------------------------------

def test_can_allocate_exact_fit_and_one_over():
    bm = BlockManager(4, 4)
    s = seq()
    assert bm.can_allocate(s, 16)
    assert not bm.can_allocate(s, 17)
    bm.allocate(s, 16)
    assert bm.num_free == 0
    assert bm.can_allocate(s, 16)                 # already held: nothing more needed
    assert not bm.can_allocate(s, 17)


def test_can_allocate_accounts_for_blocks_already_held():
    bm = BlockManager(3, 4)
    a, b = seq(), seq()
    bm.allocate(a, 8)                             # 2 blocks, 1 free
    assert bm.can_allocate(a, 12)                 # needs 1 more
    assert not bm.can_allocate(b, 5)              # needs 2
    assert bm.can_allocate(b, 4)


def test_over_allocation_raises_and_changes_nothing():
    bm = BlockManager(3, 4)
    a, b = seq(), seq()
    bm.allocate(a, 8)
    free_before, table_before = list(bm.free_blocks), list(a.block_table)
    with pytest.raises(RuntimeError):
        bm.allocate(b, 9)
    with pytest.raises(RuntimeError):
        bm.allocate(a, 13)
    assert b.block_table == []
    assert a.block_table == table_before
    assert list(bm.free_blocks) == free_before


def test_over_allocating_an_empty_cache_raises():
    bm = BlockManager(2, 8)
    with pytest.raises(RuntimeError):
        bm.allocate(seq(), 17)
    assert bm.num_free == 2


# --- free and usage ---------------------------------------------------------------------------

def test_free_returns_every_block_and_empties_table():
    bm = BlockManager(8, 4)
    s = seq()
    bm.allocate(s, 20)
    assert bm.num_free == 3
    bm.free(s)
    assert s.block_table == []
    assert bm.num_free == 8
    assert sorted(bm.free_blocks) == list(range(8))


def test_double_free_does_not_duplicate_blocks():
    bm = BlockManager(4, 4)
    s = seq()
    bm.allocate(s, 8)
    bm.free(s)
    bm.free(s)
    assert bm.num_free == 4
    assert sorted(bm.free_blocks) == [0, 1, 2, 3]


def test_free_of_blockless_sequence_is_harmless():
    bm = BlockManager(4, 4)
    bm.free(seq())
    assert bm.num_free == 4


def test_freed_blocks_are_reusable_by_another_sequence():
    bm = BlockManager(2, 4)
    a, b = seq(), seq()
    bm.allocate(a, 8)
    assert not bm.can_allocate(b, 1)
    bm.free(a)
    bm.allocate(b, 8)
    assert sorted(b.block_table) == [0, 1]
    all_blocks_accounted(bm, [a, b])


def test_usage_tracks_fraction_of_blocks_held():
    bm = BlockManager(4, 4)
    a, b = seq(), seq()
    bm.allocate(a, 4)
    assert bm.usage == pytest.approx(0.25)
    bm.allocate(b, 12)
    assert bm.usage == pytest.approx(1.0)
    bm.free(a)
    assert bm.usage == pytest.approx(0.75)
    bm.free(b)
    assert bm.usage == 0.0


# --- properties -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(block_size=st.integers(1, 8), num_blocks=st.integers(1, 20),
       ops=st.lists(st.tuples(st.integers(0, 4), st.integers(-1, 40)), max_size=60))
def test_random_alloc_free_never_shares_or_loses_blocks(block_size, num_blocks, ops):
    """ops: (which seq, tokens) with tokens == -1 meaning free; failed allocations change nothing."""
    bm = BlockManager(num_blocks, block_size)
    seqs = [seq() for _ in range(5)]
    held = [0] * 5                                # tokens each seq holds room for
    for i, n in ops:
        s = seqs[i]
        if n < 0:
            bm.free(s)
            held[i] = 0
        elif bm.can_allocate(s, n):
            bm.allocate(s, n)
            held[i] = max(held[i], n)
        else:
            free_before = bm.num_free
            with pytest.raises(RuntimeError):
                bm.allocate(s, n)
            assert bm.num_free == free_before
        all_blocks_accounted(bm, seqs)
        for s, h in zip(seqs, held):
            assert len(s.block_table) == math.ceil(h / block_size)
        assert bm.num_free == num_blocks - sum(len(s.block_table) for s in seqs)
        assert bm.usage == pytest.approx(1 - bm.num_free / num_blocks)
    for s in seqs:
        bm.free(s)
    assert bm.num_free == num_blocks


class BlockManagerMachine(RuleBasedStateMachine):
    """Stateful check: grow sequences token by token, free them, make new ones."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.seqs: list[Sequence] = []
        self.tokens: dict[int, int] = {}

    @rule()
    def new_seq(self):
        s = seq()
        self.seqs.append(s)
        self.tokens[s.seq_id] = 0

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), grow=st.integers(1, 9))
    def grow(self, data, grow):
        s = data.draw(st.sampled_from(self.seqs))
        want = self.tokens[s.seq_id] + grow
        need = self.bm.blocks_needed(s, want)
        if need <= self.bm.num_free:
            free_before = self.bm.num_free
            self.bm.allocate(s, want)
            self.tokens[s.seq_id] = want
            assert self.bm.num_free == free_before - need
        else:
            with pytest.raises(RuntimeError):
                self.bm.allocate(s, want)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(self.seqs))
        returned = len(s.block_table)
        free_before = self.bm.num_free
        self.bm.free(s)
        self.tokens[s.seq_id] = 0
        assert self.bm.num_free == free_before + returned

    @invariant()
    def conserved(self):
        if not hasattr(self, "bm"):
            return
        all_blocks_accounted(self.bm, self.seqs)
        for s in self.seqs:
            assert len(s.block_table) == math.ceil(self.tokens[s.seq_id] / self.bm.block_size)


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase


# --- prefix caching ---------------------------------------------------------------------------

def run_prompt(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence started on its cached prefix and computed to the end of its prompt."""
    s = Sequence(list(tokens), SamplingParams(), seed=0)
    cached = len(bm.cached_prefix(s)) * bm.block_size
    assert bm.can_start(s, len(tokens) - cached)
    bm.start(s, len(tokens) - cached)
    s.num_computed = len(tokens)
    bm.commit(s)
    return s


def test_a_shared_prompt_prefix_is_computed_once():
    bm = BlockManager(16, 4)
    a = run_prompt(bm, list(range(10, 20)))                  # 10 tokens: 2 full blocks named, 1 partial
    assert len(a.block_hashes) == 2 and bm.num_free == 13
    b = Sequence(list(range(10, 18)) + [99, 98, 97], SamplingParams(), seed=0)
    assert bm.cached_prefix(b) == a.block_table[:2]
    bm.start(b, 3)
    assert b.num_computed == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_count[x] for x in a.block_table] == [2, 2, 1]
    assert bm.num_free == 12                                  # b took one fresh block only
    assert (bm.stats.hit_blocks, bm.stats.hit_tokens, bm.stats.queried_tokens) == (2, 8, 21)
    all_blocks_accounted_shared(bm, [a, b])


def test_the_block_of_the_last_prompt_token_is_always_computed():
    bm = BlockManager(16, 4)
    a = run_prompt(bm, list(range(10, 18)))                   # exactly 2 full blocks
    again = Sequence(list(range(10, 18)), SamplingParams(), seed=0)
    assert bm.cached_prefix(again) == a.block_table[:1]       # the second holds the last token
    bm.start(again, 4)
    assert again.num_computed == 4 and again.block_table[1] != a.block_table[1]


def test_a_block_is_named_by_its_whole_prefix_not_its_own_tokens():
    bm = BlockManager(16, 4)
    run_prompt(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    shifted = Sequence([0, 0, 0, 0, 5, 6, 7, 8, 9], SamplingParams(), seed=0)   # same 2nd block, other 1st
    assert bm.cached_prefix(shifted) == []


def test_only_full_computed_blocks_are_named():
    bm = BlockManager(16, 4)
    s = Sequence(list(range(10, 21)), SamplingParams(), seed=0)
    bm.start(s, 11)
    s.num_computed = 6                                        # a prompt chunk: block 1 half computed
    bm.commit(s)
    assert len(s.block_hashes) == 1 and s.block_table[0] in bm.hash_of and s.block_table[1] not in bm.hash_of
    s.num_computed = 11
    bm.commit(s)
    assert len(s.block_hashes) == 2 and s.block_table[2] not in bm.hash_of


def test_freed_blocks_stay_cached_until_evicted_leaves_first():
    bm = BlockManager(4, 2)
    a = run_prompt(bm, [1, 2, 3, 4, 5, 6, 7])                 # 3 named blocks + 1 partial: the cache is full
    named = a.block_table[:3]
    bm.free(a)
    assert bm.num_free == 4 and bm.usage == 0.0 and list(bm.cached_free) == named[::-1]
    b = Sequence([50, 51, 52], SamplingParams(), seed=0)
    bm.start(b, 3)                                            # 2 fresh blocks: the uncached one, then a leaf
    assert bm.stats.evictions == 1 and named[2] not in bm.hash_of and named[0] in bm.hash_of
    again = Sequence([1, 2, 3, 4, 5, 6, 7], SamplingParams(), seed=0)
    assert bm.cached_prefix(again) == named[:2]               # the root survives with its child
    all_blocks_accounted_shared(bm, [b])


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(16, 4, prefix_caching=False)
    a = run_prompt(bm, list(range(10, 20)))
    assert a.block_hashes == [] and not bm.hash_of
    b = Sequence(list(range(10, 20)), SamplingParams(), seed=0)
    assert bm.cached_prefix(b) == []
    bm.free(a)
    assert list(bm.cached_free) == [] and bm.num_free == 16


def all_blocks_accounted_shared(bm: BlockManager, seqs) -> None:
    """With sharing: every block free, cached-and-free or held; held ones counted right; a block
    held twice is named and fully computed by each holder."""
    held = Counter(b for s in seqs for b in s.block_table)
    free, cached = list(bm.free_blocks), list(bm.cached_free)
    assert sorted(list(held) + free + cached) == list(range(bm.num_blocks))
    assert all(bm.ref_count[b] == n for b, n in held.items())
    assert all(bm.ref_count[b] == 0 for b in free + cached) and all(b in bm.hash_of for b in cached)
    for s in seqs:
        for i, b in enumerate(s.block_table):
            if held[b] > 1:
                assert b in bm.hash_of and (i + 1) * bm.block_size <= s.num_computed
    assert {h: b for b, h in bm.hash_of.items()} == bm.block_of


class SharingMachine(RuleBasedStateMachine):
    """Sequences from a few prompt families start on their cached prefixes, compute in chunks,
    and are freed; the pool never loses, duplicates or overwrites a shared block."""

    @initialize(num_blocks=st.integers(2, 16), block_size=st.integers(1, 4))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.live: list[Sequence] = []

    @rule(family=st.integers(0, 2), shared=st.integers(0, 12), tail=st.integers(1, 6))
    def start(self, family, shared, tail):
        s = Sequence([100 * (family + 1) + t for t in range(shared)] + [7_000 + len(self.live) * 10 + t
                                                                          for t in range(tail)],
                     SamplingParams(), seed=0)
        rest = s.num_tokens - len(self.bm.cached_prefix(s)) * self.bm.block_size
        if self.bm.can_start(s, rest):
            self.bm.start(s, rest)
            assert s.num_computed < s.num_tokens
            self.live.append(s)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        s = data.draw(st.sampled_from(self.live))
        s.num_computed = data.draw(st.integers(s.num_computed, s.num_tokens))
        self.bm.commit(s)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(self.live))
        self.bm.free(s)
        self.live.remove(s)

    @invariant()
    def accounted(self):
        if hasattr(self, "bm"):
            all_blocks_accounted_shared(self.bm, self.live)


TestSharing = SharingMachine.TestCase
TestSharing.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
