"""Paged KV bookkeeping: fixed-size blocks handed to sequences as they grow, and a prefix cache of full blocks.

A full block is known by a hash of its token ids and of everything before it (vLLM's scheme), so a block can be
shared by every sequence whose tokens start the same way. Shared blocks are reference counted; a block nobody uses
any more keeps its KV and hash until its space is needed, evicted least recently used first, tier by tier.
Each sequence's own state (its block table, how much of it is computed, its blocks' keys) lives on the Sequence.
"""
import hashlib
import heapq
import struct
from collections import OrderedDict

from .errors import EngineError
from .sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: its tokens (as little-endian uint32) and, through the parent's key, every token
    before them."""
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}I", *tokens), digest_size=16).digest()


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
        # per tier: cached, unused blocks; LRU first
        self.evictable: list[OrderedDict[int, None]] = [OrderedDict() for _ in tier_sizes or [num_blocks]]
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self.free) + sum(map(len, self.evictable))

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def next_hash(self, seq: Sequence) -> bytes | None:
        """The key of seq's next full block (one past the keys it has), or None when its tokens do not fill one."""
        j, bs = len(seq.hashes), self.block_size
        tokens = seq.tokens[j * bs:(j + 1) * bs]
        return block_hash(seq.hashes[-1] if j else b"", tokens) if len(tokens) == bs else None

    def match(self, seq: Sequence, limit: int) -> int:
        """Start a sequence holding no block with the cached blocks its tokens begin with, at most `limit` tokens'
        worth; returns how many tokens' KV it starts with."""
        assert not seq.table
        while len(seq.table) < limit // self.block_size and (h := self.next_hash(seq)) in self.cached:
            self._use(self.cached[h])
            seq.table.append(self.cached[h])
            seq.hashes.append(h)
        seq.computed = len(seq.table) * self.block_size
        return seq.computed

    def adopt(self, seq: Sequence) -> int:
        """Give seq a new block for its next full block and cache it under that block's key at once (its KV is
        loaded by the caller before anything reads it). Returns the block id."""
        h = self.next_hash(seq)
        assert h is not None and seq.computed == len(seq.table) * self.block_size
        block = self._take()
        self.refs[block] = 1
        self.cached[h], self.hash_of[block] = block, h
        seq.table.append(block)
        seq.hashes.append(h)
        seq.computed += self.block_size
        return block

    def reserve(self, seq: Sequence, n_tokens: int) -> None:
        """Grow seq's block table to hold n_tokens; on shortage refuse without taking any block."""
        need = self.blocks_for(n_tokens) - len(seq.table)
        if need > self.num_free:
            raise EngineError(f"out of KV cache blocks: sequence {seq.id} needs {need} more block(s) of "
                              f"{self.block_size} tokens, {self.num_free} free of {self.num_blocks}")
        for _ in range(need):
            block = self._take()
            self.refs[block] = 1
            seq.table.append(block)

    def commit(self, seq: Sequence, n: int) -> list[tuple[int, bytes]]:
        """Seq's next n tokens now have their KV in the cache: cache the blocks that made full, and return them as
        (block, key) pairs. A block another sequence cached first under the same key stays private."""
        seq.computed += n
        new = []
        while self.cache_prefixes and (len(seq.hashes) + 1) * self.block_size <= seq.computed:
            h, block = self.next_hash(seq), seq.table[len(seq.hashes)]
            assert h is not None  # the block is full
            seq.hashes.append(h)
            if h not in self.cached:
                self.cached[h], self.hash_of[block] = block, h
                new.append((block, h))
        return new

    def free_sequence(self, seq: Sequence) -> None:
        """Take back seq's blocks (cached ones keep their KV until the space is needed); it holds none after."""
        for block in seq.table:
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            if block in self.hash_of:
                self.evictable[self.tier_of[block]][block] = None
            else:
                heapq.heappush(self.free, block)
        seq.table, seq.hashes, seq.computed = [], [], 0

    def _use(self, block: int) -> None:
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
