"""Paged KV bookkeeping: fixed-size blocks, one block table per sequence, and a prefix cache of full blocks.

A full block is known by a hash of its token ids and of everything before it (vLLM's scheme), so a block can be
shared by every sequence whose tokens start the same way. Shared blocks are reference counted; a block nobody uses
any more keeps its KV and hash until its space is needed, evicted least recently used first, tier by tier.
"""
import hashlib
import heapq
from collections import OrderedDict

from .config import EngineError


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: its tokens and, through the parent's key, every token before them."""
    return hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=16).digest()


class BlockManager:
    """Hands out block ids to sequences as they grow and takes them back when they finish.

    Block ids are numbered tier by tier (device, then host, then disk): handing out the smallest free id fills the
    fastest tier first, and only when no block is free is a cached one evicted, from the fastest tier that has one.
    """

    def __init__(self, num_blocks: int, block_size: int, tier_sizes: list[int] | None = None,
                 cache_prefixes: bool = True):
        self.num_blocks, self.block_size, self.cache_prefixes = num_blocks, block_size, cache_prefixes
        self.tier_of = [t for t, n in enumerate(tier_sizes or [num_blocks]) for _ in range(n)]
        self.free = list(range(num_blocks))  # a min-heap of blocks holding nothing
        self.evictable = [OrderedDict() for _ in tier_sizes or [num_blocks]]  # per tier: cached, unused; LRU first
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.hash_of: dict[int, bytes] = {}
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # tokens each sequence has reserved room for
        self.tokens: dict[int, list[int]] = {}  # each sequence's token ids so far
        self.computed: dict[int, int] = {}  # leading tokens of each sequence whose KV is in the cache
        self.hashes: dict[int, list[bytes]] = {}  # keys of each sequence's leading full blocks
        self.next_seq = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + sum(map(len, self.evictable))

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def add_sequence(self, tokens: list[int] = ()) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.tables[seq], self.lengths[seq], self.tokens[seq], self.hashes[seq] = [], 0, list(tokens), []
        self.computed[seq] = 0
        return seq

    def next_hash(self, seq: int) -> bytes | None:
        """The key of seq's next full block (one past the keys it has), or None when its tokens do not fill one."""
        j, bs = len(self.hashes[seq]), self.block_size
        tokens = self.tokens[seq][j * bs:(j + 1) * bs]
        return block_hash(self.hashes[seq][-1] if j else b"", tokens) if len(tokens) == bs else None

    def match(self, seq: int, limit: int) -> int:
        """Start an empty sequence with the cached blocks its tokens begin with, at most `limit` tokens' worth;
        returns how many tokens' KV it starts with."""
        assert not self.tables[seq]
        while len(self.tables[seq]) < limit // self.block_size and (h := self.next_hash(seq)) in self.cached:
            self._use(self.cached[h])
            self.tables[seq].append(self.cached[h])
            self.hashes[seq].append(h)
        self.lengths[seq] = self.computed[seq] = len(self.tables[seq]) * self.block_size
        return self.computed[seq]

    def adopt(self, seq: int) -> int:
        """Give seq a new block for its next full block and cache it under that block's key at once (its KV is
        loaded by the caller before anything reads it). Returns the block id."""
        h = self.next_hash(seq)
        assert h is not None and self.lengths[seq] == len(self.tables[seq]) * self.block_size
        block = self._take()
        self.refs[block] = 1
        self.cached[h], self.hash_of[block] = block, h
        self.tables[seq].append(block)
        self.hashes[seq].append(h)
        self.lengths[seq] += self.block_size
        self.computed[seq] += self.block_size
        return block

    def reserve(self, seq: int, n_tokens: int):
        """Grow seq's block table to hold n_tokens; on shortage refuse without taking any block."""
        table = self.tables[seq]
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.num_free:
            raise EngineError(f"out of KV cache blocks: sequence {seq} needs {need} more block(s) of "
                              f"{self.block_size} tokens, {self.num_free} free of {self.num_blocks}")
        for _ in range(need):
            block = self._take()
            self.refs[block] = 1
            table.append(block)
        self.lengths[seq] = max(self.lengths[seq], n_tokens)

    def commit(self, seq: int, n: int) -> list[tuple[int, bytes]]:
        """Seq's next n tokens now have their KV in the cache: cache the blocks that made full, and return them as
        (block, key) pairs. A block another sequence cached first under the same key stays private."""
        self.computed[seq] += n
        new = []
        while self.cache_prefixes and (len(self.hashes[seq]) + 1) * self.block_size <= self.computed[seq]:
            h, block = self.next_hash(seq), self.tables[seq][len(self.hashes[seq])]
            self.hashes[seq].append(h)
            if h not in self.cached:
                self.cached[h], self.hash_of[block] = block, h
                new.append((block, h))
        return new

    def free_sequence(self, seq: int):
        for block in self.tables.pop(seq):
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            if block in self.hash_of:  # keeps its KV until the space is needed
                self.evictable[self.tier_of[block]][block] = None
            else:
                heapq.heappush(self.free, block)
        del self.lengths[seq], self.tokens[seq], self.hashes[seq], self.computed[seq]

    def slots(self, seq: int, start: int, n: int) -> tuple[list[int], list[int]]:
        """(block id, offset in block) of positions start .. start+n-1 of seq."""
        table, bs = self.tables[seq], self.block_size
        return [table[p // bs] for p in range(start, start + n)], [p % bs for p in range(start, start + n)]

    def _use(self, block: int):
        if self.refs[block] == 0:
            del self.evictable[self.tier_of[block]][block]
        self.refs[block] += 1

    def _take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        lru = next(tier for tier in self.evictable if tier)
        block, _ = lru.popitem(last=False)
        del self.cached[self.hash_of.pop(block)]
        return block
