"""Our decode-attention kernel (own_engine/native.py): where it applies, and that it computes attention."""
import pytest
import torch

from own_engine import Engine
from own_engine.attention import attend, visible
from own_engine.compute import cpu_flags
from own_engine.kernels import fused_attention
from own_engine.native import Native, PagedAttention, build, support

from .conftest import AVX2, EPYC, XEON_AMX

HERE = build(cpu_flags())
needs_kernel = pytest.mark.skipif(HERE.library is None, reason=f"this machine cannot run it: {HERE.reason}")
CPU = torch.device("cpu")


def test_support_says_why_not():
    built = Native(HERE.library or __file__, "built")  # any library: support() only reads the inputs
    ok = dict(device=CPU, dtype=torch.bfloat16, kv_dtype=torch.bfloat16, heads=32, kv_heads=8, head_dim=128,
              block_size=32)
    assert support(built, **ok) is None
    assert support(built, **{**ok, "head_dim": 64, "heads": 16, "kv_heads": 4}) is None
    assert "CUDA" in support(built, **{**ok, "device": torch.device("cuda")})
    f32 = {**ok, "dtype": torch.float32, "kv_dtype": torch.float32}
    assert support(built, **f32) is None
    assert support(built, **{**f32, "heads": 8, "kv_heads": 4, "head_dim": 32}) is None  # the quickstart's model
    assert "not float32 computed in bfloat16" in support(built, **{**ok, "kv_dtype": torch.float32})  # upcast on read
    assert "not float16 computed in float16" in support(built, **{**ok, "dtype": torch.float16,
                                                                   "kv_dtype": torch.float16})
    assert "in bfloat16, 4 query heads per KV head of 64 or 128, not 16 on 8" in support(built, **{**ok, "heads": 16})
    assert "not 32 on 8 of 96" in support(built, **{**ok, "heads": 32, "head_dim": 96})
    assert "1 or 2 or 4 or 8 query heads" in support(built, **{**f32, "heads": 24, "kv_heads": 2})
    assert "power-of-two" in support(built, **{**ok, "block_size": 48})
    assert support(Native(None, "no C++ compiler"), **ok) == "no C++ compiler"


@pytest.mark.parametrize("flags", [AVX2, EPYC, XEON_AMX], ids=["avx2", "epyc", "xeon-amx"])
def test_a_cpu_without_bf16_dot_instructions_is_not_built_for(flags, monkeypatch, tmp_path):
    """The build needs avx512_bf16 and avx512bw (the kernel's dot instructions); an AVX2 CPU gets the reason, and
    nothing is compiled. (With the flags, what is built is for the CPU at hand: -march=native.)"""
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # a compile attempt would fail, and say so
    build.cache_clear()
    try:
        got = build(flags)
    finally:
        build.cache_clear()
    if flags == AVX2:
        assert got == Native(None, "our kernel needs avx512_bf16, avx512bw: this CPU lacks it")
    else:
        assert got.library is None and "/nonexistent/c++" in got.reason
    assert not any(tmp_path.rglob("*.so"))


def pool_and_reference(lengths, heads, kv_heads, dim, block_size, window, seed, dtype):
    """A pool holding each sequence's keys in blocks scattered over it, its block tables, queries, and the
    float32 reference and torch's flash kernel over each sequence's keys."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lengths]
    total = sum(blocks) + 3
    k = (torch.randn(total * block_size, kv_heads, dim, generator=gen) * 2).to(dtype)
    v = torch.randn(total * block_size, kv_heads, dim, generator=gen).to(dtype)
    order = torch.randperm(total, generator=gen).tolist()
    tables = torch.zeros((len(lengths), max(blocks)), dtype=torch.int32)
    q = (torch.randn(len(lengths), heads, dim, generator=gen) * 2).to(dtype)
    ref, flash = [], []
    for b, (n, nb) in enumerate(zip(lengths, blocks)):
        ids, order = order[:nb], order[nb:]
        tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        rows = (torch.tensor(ids)[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        pos = torch.arange(n)
        mask = visible(pos[-1:], pos, window)
        ref.append(attend(q[b:b + 1], k[rows], v[rows], mask, dim ** -0.5)[0])
        seen = rows[mask[0]]
        flash.append(fused_attention(q[b:b + 1], k[seen], v[seen], False, None, dim ** -0.5)[0].float())
    return q, k, v, tables, torch.cat(ref), torch.cat(flash)


@needs_kernel
@pytest.mark.parametrize("dtype, dim, group", [(torch.bfloat16, 64, 4), (torch.bfloat16, 128, 4),
                                               (torch.float32, 16, 1), (torch.float32, 32, 2),
                                               (torch.float32, 64, 4), (torch.float32, 128, 8)])
@pytest.mark.parametrize("window", [None, 100])
def test_the_kernel_computes_attention_over_scattered_blocks(dtype, dim, group, window):
    """Sequences of 1 to 1,300 keys (one key, a partial block, an odd count, several parts of 256 keys merged),
    their blocks scattered over the pool, in one call: each within the flash kernel's own distance from a float32
    reference (in bf16 both round the softmax weights and the output)."""
    kernel = PagedAttention(HERE.library)
    lengths = [1, 31, 33, 256, 257, 700, 1300]
    q, k, v, tables, ref, flash = pool_and_reference(lengths, 2 * group, 2, dim, 32, window, seed=dim, dtype=dtype)
    got = kernel(q, k, v, tables, lengths, 32, window, dim ** -0.5).float()
    assert got.shape == ref.shape and got.dtype == torch.float32
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (got - ref).abs().max() <= max(2 * (flash - ref).abs().max(), tolerance)
    # each sequence as if alone: what others are in the call changes none of its bits
    for b, n in enumerate(lengths):
        alone = kernel(q[b:b + 1], k, v, tables[b:b + 1, :-(-n // 32)].contiguous(), [n], 32, window, dim ** -0.5)
        assert torch.equal(alone[0], got[b].to(dtype))


@needs_kernel
def test_the_engine_decodes_through_the_kernel_as_hf_does(tiny_model, tmp_path):
    """A bf16 model of Llama-3's attention shape: the plan says decode attention runs in our kernel, decode
    logits stay within twice HF bf16's own distance from float32 (as test_hf_parity asks of bf16 compute), and
    three sequences decoding together give each one's tokens alone; on disk as resident."""
    from transformers import AutoModelForCausalLM

    path, hf32 = tiny_model("llama_bf16_gqa4")
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref16, ref32 = hf16(ids[None]).logits[0, 69:].float(), hf32(ids[None]).logits[0, 69:]
    prompts = [ids[:70].tolist(), ids[10:15].tolist(), ids[:40].tolist()]
    alone = {}
    for placement in ({"weights": "gpu", "kv": "gpu"}, {"weights": "disk", "kv": "disk"}):
        with Engine.from_pretrained(path, max_context=256, max_batch=3, offload_dir=tmp_path / "off",
                                    **placement) as engine:
            assert "decode attention: our kernel" in engine.plan.explain()
            seqs, logits = engine.prefill([prompts[0]])
            got = torch.stack([logits[0]] + [engine.decode_one_token(seqs, [t])[0] for t in ids[70:].tolist()])
            assert (got - ref16).abs().max() <= 2 * (ref16 - ref32).abs().max()
            engine.release(seqs)
            together = engine.generate(prompts, max_new_tokens=12, ignore_eos=True)
            for i, p in enumerate(prompts):
                alone.setdefault(i, engine.generate([p], max_new_tokens=12, ignore_eos=True)[0])
                assert together[i] == alone[i]
