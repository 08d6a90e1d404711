"""What one forward pass reads, prepared once from its sequences (nano-vllm's Context): the tokens and their
positions, the rows cut into chunks of at most `chunk_rows`, where each row's K and V go, and for each piece of a
sequence the KV chunks before it. The model reads this, never the block manager or a Sequence.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import Chunk
from .sequence import Sequence


@dataclass
class Piece:
    """Consecutive rows of one sequence inside a chunk of the batch."""
    start: int  # position of its first row = tokens of the sequence already in the cache
    rows: slice  # rows of the batch
    # The KV attention reads from the cache: of positions 0 .. start-1, or with `own` (a single row, as in decode)
    # 0 .. start, its own row included: the layer writes it before it reads, so one pass over the cache does.
    cached: list[Chunk]
    own: bool = False


@dataclass
class Batch:
    tokens: torch.Tensor  # [rows] token ids
    positions: torch.Tensor  # [rows], on the CPU
    block_ids: torch.Tensor  # [rows]: the block each row's K and V go to
    offsets: torch.Tensor  # [rows]: and the row within it
    chunks: list[list[Piece]]  # run one after the other through each layer
    logit_rows: list[int]  # each sequence's last row: the logits wanted
    end: int  # one past the highest position

    def __len__(self) -> int:
        return len(self.tokens)


def prepare(work: list[tuple[Sequence, int]], chunk_rows: int, block_size: int,
            kv_chunks: Callable[[list[int], int], list[Chunk]]) -> Batch:
    """The batch computing, for each (sequence, n), its next n tokens (their blocks reserved). kv_chunks(table,
    n_tokens) lists the KV chunks of a sequence's first n_tokens positions (KVCache.chunks)."""
    chunks: list[list[Piece]] = [[]]
    logit_rows, row, room = [], 0, chunk_rows
    tokens: list[int] = []
    positions: list[int] = []
    block_ids: list[int] = []
    for seq, n in work:
        start = seq.computed
        tokens += seq.tokens[start:start + n]
        positions += range(start, start + n)
        table = seq.table
        block_ids += (table[p // block_size] for p in range(start, start + n))
        at = start
        while at < start + n:
            take = min(start + n - at, room)
            own = take == 1
            chunks[-1].append(Piece(at, slice(row, row + take), kv_chunks(seq.table, at + own), own))
            row, at, room = row + take, at + take, room - take
            if room == 0:
                chunks.append([])
                room = chunk_rows
        logit_rows.append(row - 1)
    positions_t = torch.tensor(positions)
    return Batch(torch.tensor(tokens), positions_t, torch.tensor(block_ids), positions_t % block_size,
                 [c for c in chunks if c], logit_rows, max(positions) + 1)
