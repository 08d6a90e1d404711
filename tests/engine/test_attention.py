"""Chunked attention through the fused kernels with the log-sum-exp merge equals dense SDPA and the plain-PyTorch
reference, also when the KV comes from paged blocks."""
import random

import pytest
import torch
import torch.nn.functional as F

from own_engine.attention import attend, cached_attention, chunked_attention, gathered_bias, part, visible
from own_engine.block_manager import BlockManager
from own_engine.config import ModelConfig
from own_engine.kernels import decode_attention
from own_engine.kv_cache import KVCache
from own_engine.sequence import Sequence
from own_engine.stats import EngineStats

from .conftest import slots


def dense(q, k, v, pos, kpos, window=None):
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
                                         v.repeat_interleave(g, 1).transpose(0, 1),
                                         attn_mask=visible(pos, kpos, window), scale=q.shape[-1] ** -0.5)
    return out.transpose(0, 1)


def random_qkv(t_cached, t_new, heads, kv_heads, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t_new, heads, d, generator=gen)
    k = torch.randn(t_cached + t_new, kv_heads, d, generator=gen)
    v = torch.randn(t_cached + t_new, kv_heads, d, generator=gen)
    return q, k, v, torch.arange(t_cached + t_new)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("chunk", [7, 16, 33, 200])
@pytest.mark.parametrize("t_new", [1, 13])
@pytest.mark.parametrize("window", [None, 20])
def test_chunked_attention_equals_sdpa(heads, kv_heads, chunk, t_new, window):
    t_cached = 70
    q, k, v, pos = random_qkv(t_cached, t_new, heads, kv_heads)
    cached = [(k[i:min(i + chunk, t_cached)], v[i:min(i + chunk, t_cached)], pos[i:min(i + chunk, t_cached)])
              for i in range(0, t_cached, chunk)]
    random.Random(chunk).shuffle(cached)  # the merge does not depend on the order of chunks
    got = chunked_attention(q, k[t_cached:], v[t_cached:], pos[t_cached:], cached, 16 ** -0.5, window)
    torch.testing.assert_close(got, dense(q, k, v, pos[t_cached:], pos, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 71, 200])
@pytest.mark.parametrize("window", [None, 20])
def test_a_decoded_token_attends_over_the_cache_holding_its_own_kv(chunk, window):
    """Decode writes the new token's K and V before it reads: one pass over cached chunks (one kernel call when its
    KV is one chunk) equals SDPA over every key up to and including its own."""
    q, k, v, pos = random_qkv(70, 1, 8, 2)
    cached = [(k[i:i + chunk], v[i:i + chunk], pos[i:i + chunk]) for i in range(0, 71, chunk)]
    random.Random(chunk).shuffle(cached)  # the chunk holding the token need not come first
    got = cached_attention(q, pos[70:], cached, 16 ** -0.5, window)
    torch.testing.assert_close(got, dense(q, k, v, pos[70:], pos, window), rtol=1e-5, atol=1e-5)


def test_causal_prefill_without_cache_equals_sdpa():
    q, k, v, pos = random_qkv(0, 40, 8, 2)
    got = chunked_attention(q, k, v, pos, [], 16 ** -0.5)
    torch.testing.assert_close(got, dense(q, k, v, pos, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 6), (False, 6)])
def test_fused_kernel_equals_reference(dtype, causal, window):
    """One chunk through the fused kernel against the plain-PyTorch definition, including rows the window empties
    (the CPU kernel reports those with lse 0: part() must turn them into -inf, or the merge would count them)."""
    q, k, v, _ = random_qkv(0, 12, 8, 2)
    q_pos = torch.arange(12, 24) if not causal else torch.arange(12)
    k_pos = torch.arange(12)
    out, lse = part(q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, 16 ** -0.5, window, causal)
    ref_out, ref_lse = attend(q.to(dtype), k.to(dtype), v.to(dtype), visible(q_pos, k_pos, window), 16 ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype  # upcast only where parts are merged
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    if window and not causal:
        assert lse.isinf().any() and not lse.isinf().all()  # the case above was exercised


def test_a_chunk_wholly_outside_the_window_is_skipped():
    q, k, v, _ = random_qkv(0, 4, 4, 2)
    assert part(q, k, v, torch.arange(100, 104), torch.arange(4), 1.0, window=10, causal=False) is None


@pytest.mark.parametrize("chunk_blocks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_kv_over_tiers_equals_sdpa(tmp_path, chunk_blocks, dtype):
    """KV written in prefill chunks into blocks spread over device, host and disk, with a freed neighbour leaving
    a hole, reads back for attention: stored in bfloat16, read back upcast into the float32 compute buffer."""
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    kv = KVCache(cfg, {"device": 3, "host": 2, "disk": 4}, block_size=8, chunk_blocks=chunk_blocks, dtype=dtype,
                 compute_dtype=torch.float32, device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    blocks = BlockManager(kv.num_blocks, block_size=8)
    neighbours = [Sequence([]) for _ in range(2)]
    for n in neighbours:
        blocks.reserve(n, 8)  # blocks 0 and 1
    blocks.free_sequence(neighbours[0])
    seq = Sequence([])
    q, k, v, pos = random_qkv(45, 5, 4, 2)
    k, v = k.to(dtype).float(), v.to(dtype).float()  # what the cache can hold
    for start, n in [(0, 11), (11, 24), (35, 10), (45, 5)]:
        blocks.reserve(seq, start + n)
        rows = slice(start, start + n)
        kv.write(1, kv.slots(*slots(seq.table, 8, torch.arange(start, start + n))), k[rows], v[rows])
    assert seq.table == [0, 2, 3, 4, 5, 6, 7]  # device 0 and 2 (not consecutive), host 3-4, disk 5-7
    got = chunked_attention(q, k[45:], v[45:], pos[45:], kv.read(1, kv.chunks(seq.table, 45)), 16 ** -0.5)
    kv.close()
    torch.testing.assert_close(got, dense(q, k, v, pos[45:], pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
def test_decoding_sequences_attend_together_over_one_gather(tmp_path, window):
    """Three sequences decoding one token each, their KV in the pool (one starting with blocks another holds, so its
    KV is two runs), gathered into one batch and attended in one kernel call, padding and window masked: each equals
    SDPA over its own keys."""
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    kv = KVCache(cfg, {"device": 12}, block_size=8, chunk_blocks=1, dtype=torch.float32, compute_dtype=torch.float32,
                 device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    tables, lengths = [[0, 1, 2], [3, 4], [0, 5, 6, 7]], [20, 9, 30]  # the third shares block 0 with the first
    qs, expected, reads = [], [], []
    for b, (table, n) in enumerate(zip(tables, lengths)):
        q, k, v, pos = random_qkv(n - 1, 1, 4, 2, seed=b)
        if b == 2:  # block 0 holds the first sequence's keys
            k[:8], v[:8] = first_kv
        kv.write(0, kv.slots(*slots(table, 8, pos)), k, v)
        first_kv = (k[:8], v[:8]) if b == 0 else first_kv
        qs.append(q)
        expected.append(dense(q, k, v, pos[-1:], pos, window))
        reads.append(kv.chunks(table, n))
    assert [len(r) for r in reads] == [1, 1, 2]
    g = kv.gather_index(reads)
    bias = gathered_bias(torch.tensor(lengths) - 1, g.positions, window, torch.float32, torch.device("cpu"))
    got = decode_attention(torch.cat(qs), *kv.gather(0, g), bias, 16 ** -0.5)
    kv.close()
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_a_gather_too_large_or_across_tiers_is_not_made(tmp_path):
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    kv = KVCache(cfg, {"device": 4, "disk": 2}, block_size=8, chunk_blocks=1, dtype=torch.float32,
                 compute_dtype=torch.float32, device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    assert kv.gather_index([kv.chunks([0], 8), kv.chunks([1, 2], 16)]) is not None
    assert kv.gather_index([kv.chunks([0], 8), kv.chunks([4], 8)]) is None  # device and disk
    kv.close()
    big = KVCache(cfg, {"device": 11}, block_size=4096, chunk_blocks=1, dtype=torch.float32,
                  compute_dtype=torch.float32, device=torch.device("cpu"), directory=tmp_path, stats=EngineStats())
    # K and V of 10 sequences of 4096 tokens, 2 KV heads of 16 float32: 10 MiB, the most a gather copies; 11: none
    assert big.gather_index([big.chunks([b], 4096) for b in range(10)]) is not None
    assert big.gather_index([big.chunks([b], 4096) for b in range(11)]) is None
    big.close()
