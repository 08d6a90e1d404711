"""The batch context a forward pass reads, prepared once from its sequences: rows cut into chunks, each row's KV slot,
each piece's KV chunks, the rows whose logits are wanted."""
import torch

from own_engine.batch import prepare
from own_engine.sequence import Sequence


def test_rows_are_cut_into_chunks_and_mapped_to_their_slots():
    a, b = Sequence(list(range(100, 110))), Sequence(list(range(200, 207)))
    a.table, a.computed = [5, 2, 9], 6  # 4 tokens left, across the end of block 2 into block 9 (blocks of 4)
    b.table = [0, 1]
    asked = []
    batch = prepare([(a, 4), (b, 7)], chunk_rows=8, block_size=4,
                    kv_chunks=lambda table, n: asked.append((table, n)) or [f"kv of {n}"])
    assert batch.tokens.tolist() == list(range(106, 110)) + list(range(200, 207)) and len(batch) == 11
    assert batch.positions.tolist() == [6, 7, 8, 9] + list(range(7))
    assert batch.block_ids.tolist() == [2, 2, 9, 9, 0, 0, 0, 0, 1, 1, 1]
    assert batch.offsets.tolist() == [2, 3, 0, 1, 0, 1, 2, 3, 0, 1, 2]
    (a1, b1), (b2,) = batch.chunks  # 8 rows, then the 3 left of b
    assert (a1.start, a1.rows, b1.start, b1.rows, b2.start, b2.rows) == (6, slice(0, 4), 0, slice(4, 8), 4,
                                                                          slice(8, 11))
    assert [p.cached for p in (a1, b1, b2)] == [["kv of 6"], ["kv of 0"], ["kv of 4"]]
    assert asked == [([5, 2, 9], 6), ([0, 1], 0), ([0, 1], 4)] and batch.logit_rows == [3, 10]
    assert batch.positions.dtype == batch.block_ids.dtype == torch.int64
