"""Our C++ kernels (own_engine/native.py): where each applies, and that each computes what torch computes."""
import pytest
import torch
import torch.nn.functional as F

from own_engine import Engine
from own_engine.attention import attend, visible
from own_engine.compute import cpu_flags
from own_engine.kernels import fused_attention
from own_engine.model import apply_rope, rms_norm
from own_engine.matmul import FORMS, forms_here, linear
from own_engine.native import (LayerOps, Native, PagedAttention, PrefillAttention, TileMatmul, build,
                               layer_ops_support, load, prefill_support, support)

from .conftest import AVX2, EPYC, XEON_AMX

HERE = build(cpu_flags())
needs_kernel = pytest.mark.skipif(HERE.library is None, reason=f"this machine cannot run it: {HERE.reason}")
AMX = HERE.library is not None and bool(load(HERE.library).amx_ready())
needs_amx = pytest.mark.skipif(not AMX, reason="this machine gives no AMX tiles (amx_bf16, amx_tile)")
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


def test_layer_ops_and_prefill_support_say_why_not():
    built = Native(HERE.library or __file__, "built")
    assert layer_ops_support(built, CPU, torch.bfloat16, 64) is None
    assert layer_ops_support(built, CPU, torch.float32, 32) is None
    assert "CUDA" in layer_ops_support(built, torch.device("cuda"), torch.bfloat16, 64)
    assert "not float16" in layer_ops_support(built, CPU, torch.float16, 64)
    assert "multiple of 32, not 16" in layer_ops_support(built, CPU, torch.float32, 16)
    assert layer_ops_support(Native(None, "no C++ compiler"), CPU, torch.float32, 32) == "no C++ compiler"
    assert "not float32" in prefill_support(built, CPU, torch.float32, 64)
    assert "64 or 128, not 32" in prefill_support(built, CPU, torch.bfloat16, 32)
    assert "CUDA" in prefill_support(built, torch.device("cuda"), torch.bfloat16, 64)
    assert prefill_support(Native(None, "no C++ compiler"), CPU, torch.bfloat16, 64) == "no C++ compiler"
    if HERE.library is not None:  # the last check asks the library whether this CPU gives it AMX tiles
        assert (prefill_support(built, CPU, torch.bfloat16, 128) is None) == AMX


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
        assert got == Native(None, "our kernels need avx512_bf16, avx512bw: this CPU lacks it")
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 37])
def test_layer_ops_round_as_torch_does(dtype, rows):
    """RMSNorm (alone, or after a residual add), SiLU-and-multiply and the rotary embedding in one pass each, over
    rows read at a stride (halves of one product) with a tail of columns: what model.py's torch code gives, but for
    the last bit of a float32 sum (RMSNorm's mean) or exp."""
    ops = LayerOps(HERE.library)
    gen = torch.Generator().manual_seed(rows)
    wide = (torch.randn(rows, 2 * 200, generator=gen) * 3).to(dtype)
    x, other = wide[:, :100], wide[:, 200:300]  # rows at a stride of 400, 100 columns: 6 vectors and a tail of 4
    w = (torch.rand(100, generator=gen) + 0.5).to(dtype)
    close = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=0)  # bf16: 1 ulp
    assert torch.allclose(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), **close)
    assert torch.allclose(ops.silu_mul(x, other), F.silu(x) * other, **close)
    y = other.clone()
    added, normed = ops.add_rms_norm(x, y, w, 1e-5)  # the residual add and the norm after it: those two calls' bits
    assert added is y and torch.equal(y, x + other) and torch.equal(normed, ops.rms_norm(x + other, w, 1e-5))
    gates = torch.tensor([[-300.0, -100.0, -89.0, -88.5, -87.5, -50.0, -1.0, 0.0, 50.0, 100.0] * 3], dtype=dtype)
    assert torch.allclose(ops.silu_mul(gates, torch.ones_like(gates)), F.silu(gates), **close)  # exp(-g) inf: 0
    heads = wide[:, :3 * 64].view(rows, 3, 64)  # three heads of 64, rows at a stride of 400
    angles = torch.arange(rows)[:, None] * torch.rand(32, generator=gen)
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    sin[:, :32] *= -1  # as model.Rope.tables keeps it
    assert torch.equal(ops.rope(heads, cos, sin), apply_rope(heads, cos, sin))


@needs_amx
@pytest.mark.parametrize("tq, tk, heads, kv_heads, dim, causal, ramp", [
    (37, 37, 4, 1, 64, True, 0),  # a chunk over itself: a tail of 5 rows and 5 keys
    (200, 200, 16, 4, 64, True, 0),  # several row blocks and key steps, on and off the diagonal
    (300, 1200, 16, 4, 64, True, 0),  # over cached keys: items of 4 row blocks, the last of two
    (100, 100, 8, 2, 128, True, 0),  # Llama-3 8B's heads of 128
    (61, 250, 8, 8, 128, False, 0),  # a chunk over earlier tokens' keys
    (1, 70, 8, 1, 128, False, 0),  # one row
    (64, 320, 4, 1, 64, False, 1),  # keys growing along the sequence: steps whose scores pass the max so far
])
def test_the_amx_kernel_computes_a_chunks_attention(tq, tk, heads, kv_heads, dim, causal, ramp):
    """Queries and keys read where a layer leaves them (heads of a wider row, at a stride): output and log-sum-exp
    as close to a float32 reference as the flash kernel's (both round the weights and the output to bf16: the
    largest errors are an output's last bit, 0.03 at 5)."""
    gen = torch.Generator().manual_seed(tq + tk)
    qkv = torch.randn(max(tq, tk), heads + 2 * kv_heads, dim, generator=gen) * 2
    qkv[:, heads:heads + kv_heads] *= 1 + ramp * torch.arange(len(qkv))[:, None, None] / len(qkv)
    qkv = qkv.to(torch.bfloat16)
    q, k, v = qkv[:tq, :heads], qkv[:tk, heads:heads + kv_heads], qkv[:tk, heads + kv_heads:]
    scale = dim ** -0.5
    out, lse = PrefillAttention(HERE.library)(q, k, v, causal, None, scale)
    mask = visible(torch.arange(tk - tq, tk), torch.arange(tk), None) if causal else torch.ones(tq, tk, dtype=bool)
    ref, ref_lse = attend(q, k, v, mask, scale)
    flash, flash_lse = fused_attention(q, k, v, causal, None, scale)  # causal here: tq == tk
    assert out.dtype == torch.bfloat16 and out.shape == (tq, heads, dim) and lse.shape == (tq, heads)
    ours, theirs = (out.float() - ref).abs(), (flash.float() - ref).abs()
    assert ours.max() <= 2 * theirs.max() and ours.mean() <= 1.25 * theirs.mean()  # a bf16 ulp of the output at most
    assert (lse - ref_lse).abs().max() <= max((flash_lse - ref_lse).abs().max(), 1e-5)


@needs_amx
def test_the_amx_kernel_leaves_a_window_to_torch():
    """With a sliding window's mask the call is torch's flash kernel's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, h, 64, generator=gen).to(torch.bfloat16) for h in (4, 2, 2))
    keep = visible(torch.arange(20), torch.arange(20), 5)
    bias = torch.zeros(20, 20, dtype=torch.bfloat16).masked_fill_(~keep, float("-inf"))
    got, want = PrefillAttention(HERE.library)(q, k, v, False, bias, 0.125), fused_attention(q, k, v, False, bias,
                                                                                              0.125)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("out_features, in_features", [(48, 64), (1536, 1024), (1024, 2816)])
def test_the_tile_kernel_multiplies_as_torch_does(rows, out_features, in_features):
    """Within torch's own bf16 distance from a float32 product, with and without a bias, from rows read at a
    stride; and a product over two matrices side by side gives each one's products to the bit (model.EXACT_FUSED)."""
    tiles = TileMatmul(HERE.library)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * in_features, generator=gen).bfloat16()[:, :in_features]  # rows at a stride
    w = torch.randn(2 * out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(2 * out_features, generator=gen).bfloat16()
    for bias in (None, b):
        got = tiles(x, w, bias)
        assert got is not None and got.shape == (rows, 2 * out_features) and got.dtype == torch.bfloat16
        ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        torch_bf16 = F.linear(x, w, bias).float()
        assert (got.float() - ref).abs().max() <= 2 * (torch_bf16 - ref).abs().max() + 1e-6
    halves = [tiles(x, part, None) for part in w.chunk(2)]
    assert torch.equal(tiles(x, w, None), torch.cat(halves, 1))  # type: ignore[arg-type]


@needs_amx
def test_the_tile_form_falls_back_where_the_kernel_does_not_take_the_shapes():
    """In features not a multiple of 32, out features not of 16, or float32: no product from the kernel, and
    matmul.linear's "tiles" form computes it with torch.mv or (w @ x.T).T."""
    tiles, gen = TileMatmul(HERE.library), torch.Generator().manual_seed(0)
    for rows, out_features, in_features, dtype in ((3, 32, 48, torch.bfloat16), (1, 24, 64, torch.bfloat16),
                                                   (4, 32, 64, torch.float32)):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        w = torch.randn(out_features, in_features, generator=gen).to(dtype)
        assert tiles(x, w, None) is None
        assert torch.equal(linear(x, w, None, "tiles"), linear(x, w, None, "gemv" if rows == 1 else "wxt"))
    assert forms_here(torch.bfloat16) == FORMS and "tiles" not in forms_here(torch.float32)


@needs_amx
def test_a_layer_of_decoding_rows_in_two_native_calls_gives_the_python_paths_bits(tiny_model, tmp_path):
    """Three sequences decoding together, their layers in native.DecodeLayer's two calls (products of up to 64 rows
    set to the tile kernel, the precondition, in both runs): every pass's logits bit for bit those of the layer's
    Python path, resident, with the weights in host memory, and on disk."""
    path, _ = tiny_model("llama_bf16_gqa4")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (70, 5, 40)]
    placements = ({"weights": "gpu", "kv": "gpu"}, {"weights": "cpu", "kv": "gpu"}, {"weights": "disk", "kv": "disk"})
    for placement in placements:
        passes: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        tails = []
        for native in (True, False):
            with Engine.from_pretrained(path, max_context=256, max_batch=3, offload_dir=tmp_path / f"off{native}",
                                        **placement) as engine:
                model = engine.model
                model.forms = lambda dtype, rows: "tiles" if rows <= 64 else "linear"
                forward, decode = model.forward, model.decode
                model.forward = lambda batch: passes[native].append(forward(batch)) or passes[native][-1]
                if native:
                    assert decode is not None
                    tail = decode.tail
                    decode.tail = lambda *a, **k: tails.append(len(a[0])) or tail(*a, **k)
                else:
                    model.decode = None
                engine.generate(prompts, max_new_tokens=8, ignore_eos=True)
        assert 3 in tails  # the three decoding at once went the native way
        assert len(passes[True]) == len(passes[False])
        assert all(torch.equal(a, b) for a, b in zip(passes[True], passes[False]))


@needs_kernel
def test_the_engine_decodes_through_the_kernel_as_hf_does(tiny_model, tmp_path):
    """A bf16 model of Llama-3's attention shape: the plan says decode attention, a layer's elementwise steps and
    (with AMX) prefill attention run in our kernels; prefill logits, in one chunk or in chunks of 32 (each over the
    cached keys too), and decode logits stay within twice HF bf16's own distance from float32 (as test_hf_parity
    asks of bf16 compute), and three sequences decoding together give each one's tokens alone; on disk as
    resident."""
    from transformers import AutoModelForCausalLM

    path, hf32 = tiny_model("llama_bf16_gqa4")
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref16, ref32 = hf16(ids[None]).logits[0, 69:].float(), hf32(ids[None]).logits[0, 69:]
    prompts = [ids[:70].tolist(), ids[10:15].tolist(), ids[:40].tolist()]
    alone = {}
    placements = ({"weights": "gpu", "kv": "gpu"}, {"weights": "cpu", "kv": "gpu"}, {"weights": "disk", "kv": "disk"})
    for placement in placements:
        with Engine.from_pretrained(path, max_context=256, max_batch=3, offload_dir=tmp_path / "off",
                                    **placement) as engine:
            plan = engine.plan.explain()
            assert "decode attention: our kernel" in plan and "SiLU-and-multiply: ours" in plan
            assert ("prefill attention: our AMX kernel" in plan) == AMX
            seqs, logits = engine.prefill([prompts[0]])
            got = torch.stack([logits[0]] + [engine.decode_one_token(seqs, [t])[0] for t in ids[70:].tolist()])
            assert (got - ref16).abs().max() <= 2 * (ref16 - ref32).abs().max()
            engine.release(seqs)
            together = engine.generate(prompts, max_new_tokens=12, ignore_eos=True)
            for i, p in enumerate(prompts):
                alone.setdefault(i, engine.generate([p], max_new_tokens=12, ignore_eos=True)[0])
                assert together[i] == alone[i]
    with Engine.from_pretrained(path, max_context=256, prefill_chunk=32) as engine:
        assert (engine.prefill([prompts[0]])[1][0] - ref16[0]).abs().max() <= 2 * (ref16[0] - ref32[0]).abs().max()
