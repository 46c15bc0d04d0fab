"""KV cache blocks: reference-counted, content-addressed, one block table per sequence. Plain Python.

The cache is a pool of fixed-size blocks; a sequence of n tokens holds ceil(n / block_size)
of them, listed in its block table in order.

Prefix caching: once a block is full and computed, it is named by a hash of its tokens
chained to the hash of the blocks before it, so two sequences that share a prefix name
the same blocks the same way. A sequence that starts (or restarts after preemption) takes
every cached block of its leading full blocks, adding a reference, and computes only the
rest. Blocks are shared only when full and computed, and a sequence only ever writes
slots past what it has computed, so a shared block is never written.

A block whose last reference goes stays cached, in a least-recently-freed order, and is
evicted only when a fresh block is needed and no uncached one is free. A sequence frees
its blocks last to first, so the ends of prefixes (the leaves) go before their roots.
"""

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from attention_service.sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Cumulative counts; telemetry reads them as counters."""

    queried_tokens: int = 0      # prompt tokens of sequences that looked for cached blocks
    hit_tokens: int = 0          # of those, tokens whose K/V came from the cache
    queried_blocks: int = 0
    hit_blocks: int = 0
    evictions: int = 0           # cached blocks dropped to make room


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: its tokens, chained to the name of the blocks before it.

    A cryptographic hash because a collision would silently serve another prefix's K/V,
    and one that does not depend on the process, so replicas name blocks alike."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks: deque[int] = deque(range(num_blocks))    # unreferenced, holding nothing reusable
        self.cached_free: OrderedDict[int, None] = OrderedDict()    # unreferenced, still cached: oldest first
        self.ref_count = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}                         # block -> its name, while cached
        self.block_of: dict[bytes, int] = {}                        # name -> block
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: the empty ones and the cached ones nobody holds."""
        return len(self.free_blocks) + len(self.cached_free)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # --- growing a table with fresh blocks -----------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks seq needs to hold num_tokens tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"{seq} needs {need} more blocks, {self.num_free} free")
        for _ in range(need):
            block = self._take_fresh()
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def _take_fresh(self) -> int:
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.cached_free.popitem(last=False)             # the least recently freed
        del self.block_of[self.hash_of.pop(block)]
        self.stats.evictions += 1
        return block

    # --- starting a sequence on its cached prefix ----------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks seq's leading full blocks name, without taking them.

        At most all but the block holding the last token: that token is always computed, since
        its logits give the first new token."""
        if not self.prefix_caching or seq.block_table:
            return []
        hashes = self._hashes(seq, (seq.num_tokens - 1) // self.block_size)
        found = []
        for h in hashes:
            block = self.block_of.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def can_start(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq can take its cached prefix (unless it holds forked blocks) and fresh
        blocks for the first num_tokens tokens past it."""
        if seq.block_table:
            return self.can_allocate(seq, seq.num_computed + num_tokens)
        hits = self.cached_prefix(seq)
        idle_hits = sum(1 for b in hits if self.ref_count[b] == 0)   # leave the free pool when taken
        fresh = -(-(len(hits) * self.block_size + num_tokens) // self.block_size) - len(hits)
        return fresh + idle_hits <= self.num_free

    def start(self, seq: Sequence, num_tokens: int) -> None:
        """Give seq its cached prefix, marked computed (unless it holds forked blocks), and fresh
        blocks for num_tokens more tokens."""
        if seq.block_table:
            self.allocate(seq, seq.num_computed + num_tokens)
            return
        hits = self.cached_prefix(seq)
        if self.prefix_caching:
            s = self.stats
            s.queried_tokens += seq.num_tokens
            s.queried_blocks += seq.num_tokens // self.block_size
            s.hit_tokens += len(hits) * self.block_size
            s.hit_blocks += len(hits)
        for block in hits:
            if self.ref_count[block] == 0:
                del self.cached_free[block]
            self.ref_count[block] += 1
        seq.block_table = list(hits)
        seq.block_hashes = [self.hash_of[b] for b in hits]
        seq.num_computed = len(hits) * self.block_size
        self.allocate(seq, seq.num_computed + num_tokens)

    # --- sharing a prompt between a request's choices ----------------------------------
    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """child, holding no blocks, takes parent's first num_blocks (full, computed) blocks
        as its own computed prefix: one more reference each, nothing copied or recomputed."""
        shared = parent.block_table[:num_blocks]
        for block in shared:
            self.ref_count[block] += 1
        child.block_table = list(shared)
        child.block_hashes = list(parent.block_hashes[:num_blocks])
        child.num_computed = len(shared) * self.block_size

    # --- naming blocks once they are full and computed -----------------------------------
    def commit(self, seq: Sequence) -> None:
        """Name seq's blocks that its computed tokens have filled since the last call."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        for i, h in enumerate(self._hashes(seq, full)[len(seq.block_hashes):], start=len(seq.block_hashes)):
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if h not in self.block_of and block not in self.hash_of:
                self.block_of[h], self.hash_of[block] = block, h

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """Names of seq's first n blocks, extending those it already knows."""
        out = list(seq.block_hashes[:n])
        bs = self.block_size
        for i in range(len(out), n):
            out.append(block_hash(out[-1] if out else b"", seq.token_ids[i * bs:(i + 1) * bs]))
        return out

    # --- giving blocks back ----------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop seq's references, last block first; blocks nobody holds stay cached if named."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if block in self.hash_of:
                    self.cached_free[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.block_hashes = []
