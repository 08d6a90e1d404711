import random

import pytest
import torch

from own_engine import EngineError
from own_engine.block_manager import BlockManager
from own_engine.sequence import Sequence

from .conftest import slots


def test_many_sequences_grow_and_free_without_leaks():
    manager, rng, live = BlockManager(num_blocks=64, block_size=16), random.Random(0), {}
    for _ in range(2000):
        if live and (rng.random() < 0.3 or manager.num_free < 4):
            seq = rng.choice(list(live))
            manager.free_sequence(seq)
            del live[seq]
        elif live and rng.random() < 0.5:
            seq = rng.choice(list(live))
            new_len = live[seq] + rng.randint(1, 20)
            if manager.blocks_for(new_len) - len(seq.table) <= manager.num_free:
                manager.reserve(seq, new_len)
                live[seq] = new_len
        else:
            seq = Sequence([])
            live[seq] = rng.randint(1, 40)
            manager.reserve(seq, live[seq])
        owned = [b for seq in live for b in seq.table]
        assert len(owned) == len(set(owned)) and len(owned) + manager.num_free == 64
        assert all(len(s.table) == manager.blocks_for(n) for s, n in live.items())
    for seq in list(live):
        manager.free_sequence(seq)
        assert not seq.table
    assert sorted(manager.free) == list(range(64))


def test_refuses_cleanly_when_blocks_run_out():
    manager = BlockManager(num_blocks=4, block_size=8)
    a, b = Sequence([]), Sequence([])
    manager.reserve(a, 20)  # 3 blocks
    with pytest.raises(EngineError, match="out of KV cache blocks"):
        manager.reserve(b, 9)  # 2 blocks, 1 free
    assert b.table == [] and manager.num_free == 1
    manager.reserve(b, 8)
    manager.free_sequence(a)
    manager.free_sequence(b)
    assert manager.num_free == 4


def test_fills_the_fastest_tier_first_and_maps_slots():
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = Sequence([])
    manager.reserve(seq, 10)
    assert seq.table == [0, 1, 2]
    assert [t.tolist() for t in slots(seq.table, 4, torch.arange(3, 6))] == [[0, 1, 1], [3, 0, 1]]
