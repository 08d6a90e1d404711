import random

import pytest

from own_engine import EngineError
from own_engine.block_manager import BlockManager


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
            if manager.blocks_for(new_len) - len(manager.tables[seq]) <= manager.num_free:
                manager.reserve(seq, new_len)
                live[seq] = new_len
        else:
            seq = manager.add_sequence()
            live[seq] = rng.randint(1, 40)
            manager.reserve(seq, live[seq])
        owned = [b for table in manager.tables.values() for b in table]
        assert len(owned) == len(set(owned)) and len(owned) + manager.num_free == 64
        assert all(len(manager.tables[s]) == manager.blocks_for(n) for s, n in live.items())
    for seq in list(live):
        manager.free_sequence(seq)
    assert sorted(manager.free) == list(range(64)) and not manager.tables


def test_refuses_cleanly_when_blocks_run_out():
    manager = BlockManager(num_blocks=4, block_size=8)
    a, b = manager.add_sequence(), manager.add_sequence()
    manager.reserve(a, 20)  # 3 blocks
    with pytest.raises(EngineError, match="out of KV cache blocks"):
        manager.reserve(b, 9)  # 2 blocks, 1 free
    assert manager.tables[b] == [] and manager.num_free == 1
    manager.reserve(b, 8)
    manager.free_sequence(a)
    manager.free_sequence(b)
    assert manager.num_free == 4


def test_fills_the_fastest_tier_first_and_maps_slots():
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = manager.add_sequence()
    manager.reserve(seq, 10)
    assert manager.tables[seq] == [0, 1, 2]
    assert manager.slots(seq, 3, 3) == ([0, 1, 1], [3, 0, 1])
