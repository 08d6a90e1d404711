"""KV reads: in place where they can be, else copied ahead of use by the KV thread into two alternating buffers."""
import platform
import re
import resource
import sys
import threading
import time

import pytest
import torch

from own_engine.block_manager import BlockManager
from own_engine.config import ModelConfig
from own_engine.kv_cache import KVCache
from own_engine.mapped import can_populate
from own_engine.sequence import Sequence
from own_engine.stats import EngineStats

from .conftest import slots

CFG = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})


def filled_cache(tmp_path, dtype, counts, n_tokens=40):
    kv = KVCache(CFG, counts, block_size=8, chunk_blocks=1, dtype=dtype, compute_dtype=torch.float32,
                 device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    blocks = BlockManager(kv.num_blocks, block_size=8)
    seq = Sequence([])
    blocks.reserve(seq, n_tokens)
    k = torch.randn(n_tokens, 2, 16).to(dtype).float()
    kv.write(0, kv.slots(*slots(seq.table, 8, torch.arange(n_tokens))), k, -k)
    return kv, seq.table, k


def test_the_next_chunk_is_copied_while_the_current_one_is_used(tmp_path, monkeypatch):
    kv, table, k = filled_cache(tmp_path, torch.bfloat16, {"device": 2, "disk": 3})  # bf16 under fp32: copies
    started, copy = {}, kv._copy

    def traced(tier, kpool, vpool, ids, *rest):
        started[ids[0], tier] = threading.current_thread().name
        return copy(tier, kpool, vpool, ids, *rest)

    monkeypatch.setattr(kv, "_copy", traced)
    got = []
    for c, (ck, cv, pos) in enumerate(kv.read(0, kv.chunks(table, 40))):
        if c < 4:  # the next chunk's copy starts without waiting for this one to be done with
            deadline = time.monotonic() + 10
            while len(started) < c + 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(started) == c + 2
        got.append((ck.clone(), cv.clone(), pos))
    assert set(started.values()) == {"own_engine_kv_0"}
    for ck, cv, pos in got:
        assert torch.equal(ck, k[pos]) and torch.equal(cv, -k[pos])
    kv.close()


def test_in_place_reads_copy_nothing_and_are_counted(tmp_path, monkeypatch):
    kv, table, k = filled_cache(tmp_path, torch.float32, {"device": 2, "disk": 3})
    monkeypatch.setattr(kv, "_copy", lambda *a: (_ for _ in ()).throw(AssertionError("copied")))
    chunks = list(kv.read(0, kv.chunks(table, 40)))
    assert [len(c[2]) for c in chunks] == [16, 24]  # a run of blocks read in place is one chunk, whatever chunk_blocks
    disk = chunks[1][0]
    assert disk.untyped_storage().data_ptr() == kv.tiers["disk"][2][0][0].untyped_storage().data_ptr()  # the map
    assert kv.stats.bytes[("load", "disk->host")] == 3 * 2 * 8 * 2 * 16 * 4  # 3 blocks, K and V, float32
    assert ("load", "disk->host") not in kv.stats.seconds
    kv.close()


def test_a_reader_stopped_early_leaves_no_copy_in_flight(tmp_path):
    kv, table, k = filled_cache(tmp_path, torch.bfloat16, {"device": 5})
    reader = kv.read(0, kv.chunks(table, 40))
    next(reader)
    reader.close()  # waits for the prefetch of chunk 1 before returning
    assert kv.thread._work_queue.empty()
    assert [torch.equal(ck, k[pos]) for ck, _, pos in kv.read(0, kv.chunks(table, 40))] == [True] * 5
    kv.close()


def test_chunks_read_in_place_are_runs_of_consecutive_blocks(tmp_path):
    """Compute can read a chunk in place only as one view of the pool: where the block ids break (a shared prefix
    followed by blocks of the sequence's own), a chunk ends, and only there on the CPU (no copy, no size limit);
    chunks that are copied anyway keep their full size."""
    table = [0, 1, 4, 5, 6, 2]  # device blocks 0-6 of 8: two runs and a stray block
    kv = KVCache(CFG, {"device": 8}, block_size=8, chunk_blocks=4, dtype=torch.float32, compute_dtype=torch.float32,
                 device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    assert [c.ids for c in kv.chunks(table, 45)] == [[0, 1], [4, 5, 6], [2]]
    assert [c.valid for c in kv.chunks(table, 45)] == [16, 24, 5]
    assert [c.ids for c in kv.chunks(list(range(8)), 60)] == [list(range(8))]  # longer than chunk_blocks: one view
    kv.close()
    copied = KVCache(CFG, {"device": 8}, block_size=8, chunk_blocks=4, dtype=torch.bfloat16,
                     compute_dtype=torch.float32, device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    assert [c.ids for c in copied.chunks(table, 45)] == [[0, 1, 4, 5], [6, 2]]
    copied.close()


def test_the_kernel_is_asked_whether_it_faults_pages_in_when_asked():
    """can_populate, which the plan's prefault_disk_kv follows: MADV_POPULATE_WRITE came with Linux 5.14."""
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    assert release is not None
    assert can_populate() == (sys.platform == "linux" and tuple(map(int, release.groups())) >= (5, 14))


def test_a_disk_tier_faulted_in_at_load_takes_no_page_fault_at_its_first_writes(tmp_path):
    """prefault (planner.Plan.prefault_disk_kv): a new KV file's pages at load, where otherwise the first write of
    each faults inside the request that writes it (a disk KV file is sparse). Both ways, the writes land."""
    if not can_populate():
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+): the plan does not ask for it there")
    faults = {}
    for prefault in (False, True):
        kv = KVCache(CFG, {"disk": 512}, block_size=8, chunk_blocks=1, dtype=torch.float32,
                     compute_dtype=torch.float32, device=torch.device("cpu"), directory=tmp_path / str(prefault),
                     stats=EngineStats(), prefault=prefault)
        blocks = BlockManager(kv.num_blocks, block_size=8)
        seq = Sequence([])
        blocks.reserve(seq, 4096)
        k = torch.randn(4096, 2, 16)
        where = kv.slots(*slots(seq.table, 8, torch.arange(4096)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        kv.write(0, where, k, -k)  # layer 0's K and V: 512 KiB each, 256 pages
        faults[prefault] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        ck, cv, pos = next(iter(kv.read(0, kv.chunks(seq.table, 4096))))
        assert torch.equal(ck, k[pos]) and torch.equal(cv, -k[pos])
        kv.close()
    assert faults[False] >= 200 and faults[True] < 50, faults
