"""Paged KV bookkeeping: fixed-size blocks and one block table per sequence."""
import heapq

from .config import EngineError


class BlockManager:
    """Hands out block ids to sequences as they grow and takes them back when they finish.

    Block ids are numbered tier by tier (device, then host, then disk), so handing out the smallest free id
    fills the fastest tier first.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free = list(range(num_blocks))  # a min-heap
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # tokens each sequence has reserved room for
        self.next_seq = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def add_sequence(self) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.tables[seq], self.lengths[seq] = [], 0
        return seq

    def reserve(self, seq: int, n_tokens: int):
        """Grow seq's block table to hold n_tokens; on shortage refuse without taking any block."""
        table = self.tables[seq]
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self.free):
            raise EngineError(f"out of KV cache blocks: sequence {seq} needs {need} more block(s) of "
                              f"{self.block_size} tokens, {len(self.free)} free of {self.num_blocks}")
        table.extend(heapq.heappop(self.free) for _ in range(need))
        self.lengths[seq] = n_tokens

    def free_sequence(self, seq: int):
        del self.lengths[seq]
        for block in self.tables.pop(seq):
            heapq.heappush(self.free, block)

    def slots(self, seq: int, start: int, n: int) -> tuple[list[int], list[int]]:
        """(block id, offset in block) of positions start .. start+n-1 of seq."""
        table, bs = self.tables[seq], self.block_size
        return [table[p // bs] for p in range(start, start + n)], [p % bs for p in range(start, start + n)]
