"""The prefix cache: full KV blocks reused across requests and sequences, evicted LRU under pressure, persisted in
prefix_cache_dir behind a manifest that is rebuilt when it cannot be trusted; never a different token."""
import gc
import json
import weakref

import pytest
import torch

from own_engine import Engine
from own_engine.block_manager import BlockManager
from own_engine.sequence import Sequence

DOC = [(7 * i + 3) % 500 for i in range(70)]  # 4 full blocks of 16 and 6 tokens
QUESTIONS = [[11, 12, 13], [400, 401, 402, 403, 404]]
OPTIONS = dict(block_size=16, prefill_chunk=24, max_context=128, max_batch=2)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama_gqa2")[0]


@pytest.fixture(scope="module")
def uncached(model):
    """What every question gets with no prefix cache at all."""
    with Engine.from_pretrained(model, prefix_cache=False, **OPTIONS) as engine:
        return [engine.generate(DOC + q, max_new_tokens=12) for q in QUESTIONS]


def test_a_second_question_reuses_the_document_and_gets_the_same_tokens(model, uncached):
    with Engine.from_pretrained(model, **OPTIONS) as engine:
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12) == uncached[0]
        first = dict(engine.stats.prefix)
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        second = {k: v - first[k] for k, v in engine.stats.prefix.items()}
        prefill_rows = engine.stats.tokens["prefill"]
    assert first["hit_blocks"] == 0 and first["miss_blocks"] == 4
    assert second == {"hit_blocks": 4, "disk_hit_blocks": 0, "miss_blocks": 0, "stored_blocks": 0,
                      "bytes_reused": 4 * engine.plan.block_bytes}
    assert prefill_rows == len(DOC) + 3 + (len(DOC) - 64 + 5)  # the second prefill computed only what was new


def test_a_block_is_shared_by_two_live_sequences(model, uncached):
    with Engine.from_pretrained(model, **OPTIONS) as engine:
        seqs, first = engine.prefill([DOC + QUESTIONS[0]])
        b = Sequence(DOC + QUESTIONS[1])
        engine.admit(b)
        a = seqs[0]
        shared = a.table[:4]
        assert b.table[:4] == shared and b.table[4] != a.table[4]
        assert all(engine.blocks.refs[block] == 2 for block in shared)
        logits = engine.forward([(b, len(DOC) + 5 - b.computed)], "prefill")
        assert int(logits[0].argmax()) == uncached[1][0] and int(first[0].argmax()) == uncached[0][0]
        engine.release([a])
        assert all(engine.blocks.refs[block] == 1 for block in shared)  # still held by b
        engine.release([b])
        assert all(engine.blocks.refs[block] == 0 for block in shared) and engine.blocks.num_free == 16


def test_unused_cached_blocks_are_evicted_lru_fastest_tier_first():
    manager = BlockManager(num_blocks=6, block_size=2, tier_sizes=[2, 4])
    docs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    for doc in docs[:2]:  # each caches 2 blocks, then finishes
        seq = Sequence(doc)
        manager.reserve(seq, 4)
        manager.commit(seq, 4)
        manager.free_sequence(seq)
    assert manager.num_free == 6 and len(manager.cached) == 4
    # docs[0] holds blocks 0, 1 (device), docs[1] blocks 2, 3 (disk): two fresh blocks come from the free ones
    seq = Sequence(docs[2])
    manager.reserve(seq, 4)
    assert seq.table == [4, 5] and len(manager.cached) == 4
    manager.reserve(seq, 6)  # no free block left: evict the LRU cached block of the device tier
    assert seq.table[2] == 0
    hit = Sequence(docs[0])
    assert manager.match(hit, 3) == 0  # its first block is gone, so nothing after it can be used
    reuse = Sequence(docs[1])
    assert manager.match(reuse, 4) == 4 and manager.refs[2] == manager.refs[3] == 1


def test_eviction_under_pressure_keeps_tokens_right(model, uncached):
    """A cache of 8 blocks: the document's blocks go when a long unrelated prompt needs the room."""
    with Engine.from_pretrained(model, **{**OPTIONS, "max_batch": 1}) as engine:
        assert engine.blocks.num_blocks == 8
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12) == uncached[0]
        engine.generate(list(range(200, 310)), max_new_tokens=12)  # 122 tokens: all 8 blocks
        hits = engine.stats.prefix["hit_blocks"]
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        assert engine.stats.prefix["hit_blocks"] == hits  # evicted: recomputed, nothing reused


def test_prefix_cache_dir_warms_a_new_engine_and_a_bad_manifest_is_rebuilt(model, uncached, tmp_path):
    store = tmp_path / "prefix"
    with Engine.from_pretrained(model, **OPTIONS, prefix_cache_dir=store) as engine:
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12) == uncached[0]
        assert engine.stats.prefix["stored_blocks"] >= 4 and engine.stats.prefix["store_rebuilt"]
    with Engine.from_pretrained(model, **OPTIONS, prefix_cache_dir=store) as engine:  # a new process, as it were
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        assert engine.stats.prefix["disk_hit_blocks"] == 4 and not engine.stats.prefix["store_rebuilt"]

    manifest = store / "manifest.json"
    for damage in (lambda m: m.write_text("{not json"),
                   lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "key": {"block_size": 32}}))):
        damage(manifest)
        with Engine.from_pretrained(model, **OPTIONS, prefix_cache_dir=store) as engine:
            assert engine.stats.prefix["store_rebuilt"] and not list((store / "blocks").iterdir())
            assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
            assert engine.stats.prefix["disk_hit_blocks"] == 0

    with Engine.from_pretrained(model, **{**OPTIONS, "block_size": 32}, prefix_cache_dir=store) as engine:
        assert engine.stats.prefix["store_rebuilt"]  # blocks of 16 tokens are no use to blocks of 32
        engine.generate(DOC + QUESTIONS[0], max_new_tokens=2)
    files = sorted((store / "blocks").iterdir())
    files[0].write_bytes(files[0].read_bytes()[:100])  # a damaged block file: dropped, its block recomputed
    with Engine.from_pretrained(model, **{**OPTIONS, "block_size": 32}, prefix_cache_dir=store) as engine:
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        assert engine.stats.prefix["disk_hit_blocks"] < 2


def test_prefix_cache_dir_warms_a_kv_cache_on_disk(model, uncached, tmp_path):
    """The blocks go to the store from a KV cache on disk and come back into one (KVCache.blocks_data and
    load_block read and write a mapped tier layer by layer, a tier in memory in one copy)."""
    options = {**OPTIONS, "weights": "disk", "kv": "disk", "prefix_cache_dir": tmp_path / "prefix"}
    with Engine.from_pretrained(model, **options, offload_dir=tmp_path / "off1") as engine:
        assert set(engine.plan.kv_blocks) == {"disk"}
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12) == uncached[0]
        assert engine.stats.prefix["stored_blocks"] >= 4
    with Engine.from_pretrained(model, **options, offload_dir=tmp_path / "off2") as engine:
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        assert engine.stats.prefix["disk_hit_blocks"] == 4


def test_blocks_reach_prefix_cache_dir_once_the_engine_is_idle(model, uncached, tmp_path):
    """No token waits for the blocks' files, nor shares the CPU with their writing: they are handed to the store's
    writer once no sequence runs (here: after the last token), and all written when generate returns."""
    store = tmp_path / "prefix"
    files_at_token = []
    with Engine.from_pretrained(model, **{**OPTIONS, "prefill_chunk": 128}, prefix_cache_dir=store) as engine:
        on_token = lambda i, t: files_at_token.append(len(list((store / "blocks").iterdir())))  # noqa: E731
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12, on_token=on_token) == uncached[0]
        assert files_at_token == [0] * 12 and engine.store is not None and engine.store.writer is not None
        assert engine.stats.prefix["stored_blocks"] == len(list((store / "blocks").iterdir())) >= 4


def test_a_busy_engine_persists_blocks_that_waited_long_enough(model, uncached, tmp_path, monkeypatch):
    """Blocks do not wait for idleness past PERSIST_AFTER_S: with 0, the prompt's blocks are handed to the writer
    right after its pass, tokens still to come; a block another sequence took meanwhile is not stored."""
    monkeypatch.setattr("own_engine.engine.PERSIST_AFTER_S", 0.0)
    tokens_at_save = []
    with Engine.from_pretrained(model, **{**OPTIONS, "prefill_chunk": 128}, prefix_cache_dir=tmp_path / "p") as engine:
        assert engine.store is not None
        save = engine.store.save
        monkeypatch.setattr(engine.store, "save", lambda blocks, saved: (tokens_at_save.append(len(got)),
                                                                         save(blocks, saved)))
        got: list[int] = []
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12, on_token=lambda i, t: got.append(t)) == (
            uncached[0])
        assert tokens_at_save == [1, 8]  # the prompt's 4 blocks, then the one its 80th token filled
        engine.unsaved, engine.unsaved_since = [(0, b"taken by another")], 0.0  # block 0 holds another's key now
        engine.persist(idle=False)
        assert tokens_at_save == [1, 8] and engine.unsaved == []


def test_an_engine_left_unclosed_is_still_finalized_with_its_store_writer(model, tmp_path):
    """The store's writer thread holds no reference to the engine: an engine dropped without close() is collected,
    and its finalizer writes what was queued and ends the thread."""
    engine = Engine.from_pretrained(model, **OPTIONS, prefix_cache_dir=tmp_path / "prefix")
    engine.generate(DOC + QUESTIONS[0], max_new_tokens=2)
    writer, gone = engine.store.writer, weakref.ref(engine)
    assert writer is not None and writer.is_alive()
    del engine
    gc.collect()
    assert gone() is None and not writer.is_alive()
    assert len(list((tmp_path / "prefix" / "blocks").iterdir())) >= 4


def test_the_prompt_is_never_wholly_cached(model):
    """A prompt made only of cached full blocks still computes its last token, for the logits."""
    with Engine.from_pretrained(model, **OPTIONS) as engine:
        seqs, logits = engine.prefill([DOC[:64]])
        engine.release(seqs)
        again, logits2 = engine.prefill([DOC[:64]])
        assert engine.stats.prefix["hit_blocks"] == 3 and torch.allclose(logits, logits2, atol=1e-5)


def test_a_full_disk_stops_persisting_not_the_request(model, uncached, tmp_path, monkeypatch):
    with Engine.from_pretrained(model, **OPTIONS, prefix_cache_dir=tmp_path / "prefix") as engine:
        def full(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(engine.store, "put", full)
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12) == uncached[0]
        assert engine.store is None and "No space left" in engine.stats.prefix["store_error"]
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        assert engine.stats.prefix["hit_blocks"] == 4  # the memory cache goes on


def test_a_cached_prefix_is_read_in_place_and_starts_no_thread(model, uncached, monkeypatch):
    """A sequence holding another's cached blocks, then blocks of its own, has a break in its block ids: its KV is
    read as several in-place chunks, never copied on the KV thread. (A torch op on that thread gave it an OpenMP
    team of its own, after which every parallel region woke sleeping workers: each later prompt took up to twice as
    long, with the prefix cache on only. See kv_cache.KVCache.chunks.)"""
    with Engine.from_pretrained(model, **{**OPTIONS, "prefill_chunk": 128}) as engine:
        monkeypatch.setattr(engine.kv, "_copy", lambda *a: (_ for _ in ()).throw(AssertionError("copied")))
        assert engine.generate(DOC + QUESTIONS[0], max_new_tokens=12) == uncached[0]
        assert engine.generate(DOC + QUESTIONS[1], max_new_tokens=12) == uncached[1]
        assert engine.stats.prefix["hit_blocks"] == 4 and not engine.kv.thread._threads
