"""Our C++ kernels (csrc/), built for this CPU on first use: decode attention over the paged KV cache
(paged_attention.cpp), a prefill chunk's attention with AMX tiles (prefill_attention.cpp), a layer's elementwise
steps fused per row (layer_ops.cpp), the products of a few rows by the weights with AMX tiles (tile_matmul.cpp), and a
layer of decoding rows as two calls of those (decode_layer.cpp: the ~45 tensor operations a layer made in Python
between them took ~3 ms of an 18 ms decode step).

Decode attention: torch's CPU flash kernel is compute-bound on a decode's few query rows: for the 201M bf16 benchmark
model (16 query heads on 4 KV heads of 64) it took 0.32 ms a layer over 2,048 cached tokens and 1.24 ms over 8,192,
where reading their K and V takes 0.08 and 0.34 ms (2-thread Intel Xeon with AMX, caches flushed between calls); and
several sequences first had their KV gathered into one tensor. The kernel reads each sequence's keys where they lie
in the pool, through its block table, with bf16 dot instructions and each KV head's four query rows held in
registers: 0.16 and 0.57 ms, and 0.46 against 0.95-1.4 ms for 8 sequences of 704 tokens in scattered blocks (gather
included), with the flash kernel's error against a float32 reference (docs/own_engine.md). So it applies where those
instructions are (avx512_bf16, avx512bw): to a bf16 KV cache read in place with four query heads per KV head of 64
or 128 (Llama-3's and Mistral's shapes), and to a float32 one (float32 FMAs: 2,048 tokens 0.21 against 0.41 ms; 4
sequences of 160 tokens of the quickstart's tiny model 0.05 against 0.10 ms with the gather) with 1, 2, 4 or 8 query
heads per KV head of 16 to 128; power-of-two blocks. Elsewhere decode attention stays torch's, and the plan says why
(`support`).

Prefill attention: torch's flash kernel reached ~0.5 TFLOP/s on a 2,048-token causal chunk (17.5 ms a layer of the
same model); ours computes both products as bf16 tile instructions on K and V packed for them, the online softmax on
AVX-512 in base 2: 8.8 ms, and 33 against 49 ms for 2,048 queries over 4,096 keys, at the flash kernel's error
(docs/own_engine.md). It needs AMX tiles (amx_bf16, amx_tile), bf16 compute, heads of 64 or 128.

Products of a few rows (tile_matmul.cpp): memory-bound, so what counts is how fast the weights stream; the weights
are the tiles' first operand, loaded from their rows in place: 1 row ~27 GB/s against torch.mv's ~23, 32 rows ~21
against (w @ x.T).T's ~15 (12 layers of that model). matmul.py's "tiles" form, chosen by the forms micro-benchmark
(compute.py) where it runs: AMX tiles, bf16 weights, in features a multiple of 32, out features of 16.

Layer ops: RMSNorm, the rotary embedding and SiLU-and-multiply, each one pass over its rows with transformers'
roundings, where torch makes several whole-tensor passes (2,048 rows of the same model: RMSNorm 0.34 against 2.4 ms,
rotary 0.45 against 1.6 ms; SiLU-and-multiply 0.47 against 0.69-0.95 ms for 512 rows, a memory-bound pass).

The build is `g++ -O3 -march=native -fopenmp` (the system's compiler, or $CXX): a few seconds, kept under
$LLMBENCH_CACHE/own_engine/native (default ~/.cache/llmbench) keyed by the sources, the compiler and the CPU's flags,
so a cache shared with another CPU builds anew. No float contraction (-ffp-contract=off): a product then a sum round
as torch's do. The library links libgomp.so.1, which the loader resolves to the copy torch loaded: one OpenMP runtime
and thread pool. Without a compiler (a slim container) the engine runs as before.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from llmbench.cpu import cpu_model, cpuinfo_flags

from .kernels import fused_attention

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))  # compiled into one library, with the headers beside them
NEEDS = ("avx512_bf16", "avx512bw")  # the CPU flags its instructions need
# The shapes it was built for, per dtype: head sizes, and query heads per KV head.
SHAPES = {torch.bfloat16: ((64, 128), (4,)), torch.float32: ((16, 32, 64, 128), (1, 2, 4, 8))}


@dataclass(frozen=True)
class Native:
    """The built kernel library (None where it could not be built) and what was done or why not."""
    library: Path | None
    reason: str


def support(native: "Native | None", device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, heads: int,
            kv_heads: int, head_dim: int, block_size: int) -> str | None:
    """Why decode attention cannot run in our kernel with these inputs, or None when it can."""
    if why := _unbuilt(native, device):
        return why
    if dtype not in SHAPES or kv_dtype != dtype:
        kv, compute = (str(d).removeprefix("torch.") for d in (kv_dtype, dtype))
        return f"our kernel takes a bfloat16 or float32 KV cache read in place, not {kv} computed in {compute}"
    dims, groups = SHAPES[dtype]
    if heads % kv_heads or heads // kv_heads not in groups or head_dim not in dims:
        return (f"our kernel takes, in {str(dtype).removeprefix('torch.')}, {' or '.join(map(str, groups))} query "
                f"heads per KV head of {' or '.join(map(str, dims))}, not {heads} on {kv_heads} of {head_dim}")
    if block_size & (block_size - 1):
        return f"our kernel takes power-of-two KV blocks, not {block_size}"
    return None


def _unbuilt(native: "Native | None", device: torch.device) -> str | None:
    """Why none of our kernels can run here (CUDA, or no library), or None."""
    if device.type != "cpu":
        return "torch's kernels on CUDA"
    if native is None or native.library is None:
        return native.reason if native else "our kernels were not built"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("LLMBENCH_CACHE", Path.home() / ".cache" / "llmbench")) / "own_engine" / "native"


@lru_cache(maxsize=1)
def build(flags: frozenset[str]) -> Native:
    """The kernels' library for a CPU with these flags: from the cache, else compiled now; Native(None, why) when
    the CPU lacks NEEDS, no C++ compiler is found or the build fails."""
    missing = [f for f in NEEDS if f not in flags]
    if missing:
        return Native(None, f"our kernels need {', '.join(missing)}: this CPU lacks it")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return Native(None, "no C++ compiler to build our kernels (g++, or $CXX)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Native(None, f"C++ compiler {compiler}: {e}")
    parts = [*(p.read_text() for p in sorted(CSRC.glob("*.[ch]*"))), version, cpu_model(), *sorted(flags)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    library = cache_dir() / f"kernels-{key[:16]}.so"
    if library.exists():
        return Native(library, f"built before, kept in {library}")
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        tmp = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        done = subprocess.run([compiler, "-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fopenmp",
                               "-shared", "-fPIC", *map(str, SOURCES), "-o", str(tmp)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            return Native(None, f"our kernels did not build ({compiler}): {done.stderr.strip()[-300:]}")
        tmp.replace(library)  # whole or not at all, for another process building the same
    except (OSError, subprocess.SubprocessError) as e:
        return Native(None, f"our kernels did not build ({compiler}): {e}")
    return Native(library, f"built now with {compiler}, kept in {library}")


@lru_cache(maxsize=None)
def load(library: Path) -> ctypes.CDLL:
    """The library, loaded once per process, its functions typed."""
    lib = ctypes.CDLL(str(library))
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.paged_attention.argtypes = [i32, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, f32, ptr, ptr,
                                    i64, i32]
    lib.paged_attention.restype = i32
    lib.layer_rms_norm.argtypes = [i32, ptr, i64, ptr, ptr, i64, i64, f32, i32]
    lib.layer_silu_mul.argtypes = [i32, ptr, ptr, i64, ptr, i64, i64, i32]
    lib.layer_add_rms_norm.argtypes = [i32, ptr, i64, ptr, ptr, ptr, i64, i64, f32, i32]
    lib.layer_rope.argtypes = [i32, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.prefill_attention.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i32, f32,
                                      ptr, ptr, ptr, ptr, i32]
    lib.prefill_attention.restype = i32
    lib.tile_matmul.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ptr, i32]
    lib.tile_matmul.restype = i32
    lib.decode_layer_head.argtypes = [ptr, ptr, f32, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr,
                                      i32]
    lib.decode_layer_head.restype = i32
    lib.decode_layer_tail.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, ptr, ptr,
                                      ptr, f32, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.decode_layer_tail.restype = i32
    return lib


def prefill_support(native: "Native | None", device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why a prefill chunk's attention cannot run in our AMX kernel, or None when it can."""
    if why := _unbuilt(native, device):
        return why
    if dtype != torch.bfloat16:
        return f"our AMX kernel computes in bfloat16, not {str(dtype).removeprefix('torch.')}"
    if head_dim not in (64, 128):
        return f"our AMX kernel takes heads of 64 or 128, not {head_dim}"
    return _no_tiles(native)


def _no_tiles(native: "Native | None") -> str | None:
    """Why our AMX kernels cannot run in this process (the library is built), or None."""
    assert native is not None and native.library is not None  # _unbuilt said so
    if not load(native.library).amx_ready():
        return "this CPU or kernel does not give us AMX tiles (amx_bf16, amx_tile)"
    return None


def layer_ops_support(native: "Native | None", device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why a layer's elementwise steps cannot run in our kernels, or None when they can."""
    if why := _unbuilt(native, device):
        return why
    if dtype not in (torch.bfloat16, torch.float32):
        return f"our kernels compute in bfloat16 or float32, not {str(dtype).removeprefix('torch.')}"
    if head_dim % 32:
        return f"our rotary kernel takes heads of a multiple of 32, not {head_dim}"
    return None


class LayerOps:
    """A layer's elementwise steps, each one pass over its rows (csrc/layer_ops.cpp), in bf16 or float32, with
    model.py's roundings: rms_norm (alone, or after the residual add: add_rms_norm), silu_mul (mlp) and rope
    (apply_rope). Inputs' rows may be strided; their last dim is contiguous."""

    def __init__(self, library: Path):
        self.lib = load(library)

    @staticmethod
    def _code(x: torch.Tensor) -> int:
        assert x.dtype in (torch.bfloat16, torch.float32) and x.stride(-1) == 1
        return 0 if x.dtype == torch.bfloat16 else 1

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [rows, cols], weight [cols] (as stored: a narrow pass's may be narrower than x)."""
        weight = weight.to(x.dtype)
        y = torch.empty(x.shape, dtype=x.dtype)
        self.lib.layer_rms_norm(self._code(x), x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), x.shape[0],
                                x.shape[1], eps, torch.get_num_threads())
        return y

    def add_rms_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, its rms_norm) in one pass, the sum written over y (contiguous, x's shape and dtype)."""
        assert y.is_contiguous() and y.shape == x.shape and y.dtype == x.dtype
        weight = weight.to(x.dtype)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.lib.layer_add_rms_norm(self._code(x), x.data_ptr(), x.stride(0), y.data_ptr(), weight.data_ptr(),
                                    out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
        return y, out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [rows, cols] with the same row stride (two halves of one product, or two products)."""
        assert gate.stride() == up.stride() and gate.shape == up.shape
        y = torch.empty(gate.shape, dtype=gate.dtype)
        self.lib.layer_silu_mul(self._code(gate), gate.data_ptr(), up.data_ptr(), gate.stride(0), y.data_ptr(),
                                gate.shape[0], gate.shape[1], torch.get_num_threads())
        return y

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [rows, heads, dim] with contiguous heads; cos, sin [rows, dim] contiguous (model.Rope.tables)."""
        rows, heads, dim = x.shape
        assert x.stride(1) == dim and cos.is_contiguous() and sin.is_contiguous()
        y = torch.empty(x.shape, dtype=x.dtype)
        self.lib.layer_rope(self._code(x), x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), y.data_ptr(),
                            rows, heads, dim, torch.get_num_threads())
        return y


class PrefillAttention:
    """A prefill chunk's attention over a chunk of keys with AMX tiles (csrc/prefill_attention.cpp): in bf16, heads
    of 64 or 128, no mask (a window's mask goes to torch's kernel). Called as kernels.fused_attention is, and
    returns what it returns: out [Tq, H, D] in bf16, lse [Tq, H] float32."""

    def __init__(self, library: Path):
        self.call = load(library).prefill_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, bias: torch.Tensor | None,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if bias is not None:
            return fused_attention(q, k, v, causal, bias, scale)
        tq, heads, d = q.shape
        tk, kv_heads, _ = k.shape
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.stride(2) == k.stride(2) == v.stride(2) == 1
        out, lse = torch.empty(tq, heads, d, dtype=q.dtype), torch.empty(tq, heads)
        packed = kv_heads * -(-tk // 32) * 32 * d  # K and V packed for the tiles, keys padded to 32
        kp, vp = torch.empty(packed, dtype=q.dtype), torch.empty(packed, dtype=q.dtype)
        failed = self.call(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                           v.data_ptr(), v.stride(0), v.stride(1), tq, tk, heads, kv_heads, d, int(causal and tq > 1),
                           scale, out.data_ptr(), lse.data_ptr(), kp.data_ptr(), vp.data_ptr(),
                           torch.get_num_threads())
        assert not failed, f"our AMX kernel cannot run heads of {d}"  # prefill_support checked
        return out, lse


def tile_scratch(k: int, rows: int) -> torch.Tensor:
    """The tile kernel's scratch for `rows` rows of x with k columns: x^T as the tiles take it (tile_matmul.cpp)."""
    return torch.empty(k // 32 * -(-rows // 16) * 512, dtype=torch.bfloat16)


def paged_scratch(part: int, lengths: list[int], window: int | None, heads: int, dim: int) -> tuple[int, torch.Tensor]:
    """(parts, scratch) of the decode-attention kernel for these sequences: each one's visible keys in parts of
    `part` (paged_attention_part), and per (sequence, part, head) a max, a sum and dim values (paged_attention.cpp)."""
    visible = max(lengths) if window is None else min(max(lengths), window)
    parts = -(-visible // part)
    return parts, torch.empty(len(lengths) * parts * heads * (dim + 2))


class TileMatmul:
    """x @ w.T (+ b) for a few rows of x with AMX tiles (csrc/tile_matmul.cpp), in bf16, w's rows contiguous: the
    form matmul.linear calls "tiles"."""

    def __init__(self, library: Path):
        self.call = load(library).tile_matmul

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
        """The product, or None for inputs the kernel does not take (not bf16, in features not a multiple of 32,
        out features not a multiple of 16)."""
        rows, k = x.shape
        n = w.shape[0]
        if (k % 32 or n % 16 or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.stride(1) != 1
                or w.stride() != (k, 1) or (b is not None and (b.dtype != torch.bfloat16 or b.stride(0) != 1))):
            return None
        y = torch.empty(rows, n, dtype=torch.bfloat16)
        packed = tile_scratch(k, rows)
        self.call(x.data_ptr(), x.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), n,
                  rows, n, k, packed.data_ptr(), torch.get_num_threads())
        return y


@lru_cache(maxsize=1)
def tile_matmul() -> TileMatmul | None:
    """The tile kernel, where it runs on this CPU (the library built for its flags, the tiles granted)."""
    native = build(cpuinfo_flags() or frozenset())
    if _unbuilt(native, torch.device("cpu")) or _no_tiles(native):
        return None
    assert native.library is not None  # _unbuilt said so
    return TileMatmul(native.library)


class DecodeLayer:
    """A decoder layer's steps for decoding rows, bf16, in two calls around the KV write (csrc/decode_layer.cpp): the
    kernels the layer's Python path calls, in its order, with none of its ~45 tensor operations a layer between them
    (model.Transformer.decoder_layer says where it applies). Weights: qkv and gate_up fused (weights.fused), no bias
    but qkv's."""

    def __init__(self, library: Path):
        lib = load(library)
        self.head_call, self.tail_call = lib.decode_layer_head, lib.decode_layer_tail
        self.part = lib.paged_attention_part()
        # The calls' working memory, kept while the next call has the same shapes: every layer of a pass has them.
        self.scratch: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}

    def _scratch(self, call: str, key: tuple[Any, ...], make: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        if (kept := self.scratch.get(call)) is None or kept[0] != key:
            self.scratch[call] = kept = key, make()
        return kept[1]

    def head(self, x: torch.Tensor, norm: torch.Tensor, eps: float, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
             cos: torch.Tensor, sin: torch.Tensor, qk_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, hidden] contiguous: (qkv [n, qkv columns], its first qk_heads heads rotated, [n, qk_heads, dim])."""
        n, hidden = x.shape
        cols = qkv_w.shape[0]
        qkv, qk = torch.empty(n, cols, dtype=x.dtype), torch.empty(n, qk_heads, dim, dtype=x.dtype)
        h, packed = self._scratch("head", (n, hidden), lambda: (torch.empty_like(x), tile_scratch(hidden, n)))
        failed = self.head_call(x.data_ptr(), norm.data_ptr(), eps, qkv_w.data_ptr(),
                                None if qkv_b is None else qkv_b.data_ptr(), n, hidden, cols, qk_heads, dim,
                                cos.data_ptr(), sin.data_ptr(), h.data_ptr(), qkv.data_ptr(), qk.data_ptr(),
                                packed.data_ptr(), torch.get_num_threads())
        assert not failed, "the tile kernel does not take these shapes"  # Transformer checked them
        return qkv, qk

    def tail(self, qk: torch.Tensor, heads: int, kpool: torch.Tensor, vpool: torch.Tensor, tables: torch.Tensor,
             lengths: list[int], block_size: int, window: int | None, scale: float, x: torch.Tensor,
             o_w: torch.Tensor, norm: torch.Tensor, eps: float, gate_up_w: torch.Tensor,
             down_w: torch.Tensor) -> torch.Tensor:
        """The layer's output [n, hidden] from qk (head's) after the new rows' K and V are written to the pools."""
        n, qk_heads, dim = qk.shape
        hidden, inter, kv_heads = x.shape[1], down_w.shape[1], kpool.shape[1]
        y = torch.empty_like(x)
        kept = self._scratch("tail", (tuple(lengths), window, heads, dim, hidden, inter),
                             lambda: (*paged_scratch(self.part, lengths, window, heads, dim),
                                      torch.empty(n * (2 * heads * dim + 3 * hidden + 3 * inter), dtype=x.dtype),
                                      tile_scratch(max(hidden, inter, heads * dim), n),
                                      torch.tensor(lengths, dtype=torch.int32)))
        parts, scores, buf, packed, counts = kept
        failed = self.tail_call(qk.data_ptr(), qk_heads, kpool.data_ptr(), vpool.data_ptr(), tables.data_ptr(),
                                tables.shape[1], counts.data_ptr(), heads, kv_heads, dim, block_size, window or 0,
                                scale, parts, x.data_ptr(), o_w.data_ptr(), norm.data_ptr(), eps,
                                gate_up_w.data_ptr(), down_w.data_ptr(), n, hidden, inter, y.data_ptr(),
                                buf.data_ptr(), scores.data_ptr(), packed.data_ptr(), torch.get_num_threads())
        assert not failed, "a kernel does not take these shapes"  # Transformer checked them
        return y


class PagedAttention:
    """The loaded kernel: one new token per sequence over its keys in a KV pool, by block table."""

    def __init__(self, library: Path):
        lib = load(library)
        self.call, self.part = lib.paged_attention, lib.paged_attention_part()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: list[int],
                 block_size: int, window: int | None, scale: float) -> torch.Tensor:
        """q [n, heads, dim]; k, v a pool's rows [rows, kv_heads, dim], contiguous, in q's dtype (bf16 or
        float32); tables [n, blocks] int32, each sequence's block ids (within the pool) in key order; lengths its
        key counts, the new token's own key last. Returns [n, heads, dim] in q's dtype."""
        n, heads, dim = q.shape
        parts, scratch = paged_scratch(self.part, lengths, window, heads, dim)
        q, out = q.contiguous(), torch.empty_like(q)
        counts = torch.tensor(lengths, dtype=torch.int32)
        assert k.is_contiguous() and v.is_contiguous() and tables.is_contiguous() and tables.dtype == torch.int32
        kv_heads = k.shape[1]
        failed = self.call(0 if q.dtype == torch.bfloat16 else 1, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                           tables.data_ptr(), tables.shape[1], counts.data_ptr(), n, heads // kv_heads, kv_heads, dim,
                           block_size, window or 0, scale, out.data_ptr(), scratch.data_ptr(), parts,
                           torch.get_num_threads())
        assert not failed, f"our kernel was not built for {q.dtype} heads of {dim}"  # support() checked the shapes
        return out
