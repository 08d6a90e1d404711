"""The Llama-family decoder, run layer by layer over a batch so each layer's weights are needed only once
per forward pass however many prefill chunks or sequences the batch holds. Activations are in the compute dtype."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import chunked_attention
from .block_manager import BlockManager
from .config import ModelConfig
from .kv_cache import KVCache
from .placement import Globals, LayerWeights


# Below this many rows in a forward pass, matmuls read the weights as stored even when compute runs wider: a
# bf16 matrix-vector product is memory-bound and accumulates in float32, so it beats upcasting the layer first, and
# emulated bf16 falls far behind only as rows grow. Measured on AVX2 without bf16 instructions, a whole decode step
# of the 201M-parameter benchmark Llama (benchmarks/engine_cpu.py): 4 rows 118 ms read as stored vs 190 ms upcast,
# 6 rows 163 vs 205, 8 rows 191 vs 186 (one matrix alone suggested 4; the layer's upcast costs more than that).
NARROW_ROWS = 8


@dataclass
class Piece:
    """Consecutive rows of one sequence inside a forward batch."""
    seq: int
    start: int  # position of its first row = tokens of the sequence already in the cache
    rows: slice  # rows of the batch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling:  # llama3: slow down low frequencies by `factor`, blend the middle band
        s = cfg.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        inv = torch.where((wavelen >= old / high) & (wavelen <= old / low), blended, scaled)
    return inv


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin [T, head_dim] of each position, computed in float32 as transformers does."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim]."""
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b in x's dtype, reading w in its own (see NARROW_ROWS)."""
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def mlp(x: torch.Tensor, w: dict, rows: int) -> torch.Tensor:
    """SwiGLU, `rows` rows at a time so the [rows, intermediate] activations stay bounded."""
    out = torch.empty_like(x)
    for r in range(0, x.shape[0], rows):
        xs = x[r:r + rows]
        gate = F.silu(linear(xs, w["mlp.gate_proj.weight"]))
        out[r:r + rows] = linear(gate * linear(xs, w["mlp.up_proj.weight"]), w["mlp.down_proj.weight"])
    return out


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: LayerWeights, globals_: Globals, kv: KVCache,
                 blocks: BlockManager, mlp_rows: int, device: torch.device, compute_dtype: torch.dtype):
        self.cfg, self.weights, self.globals, self.kv, self.blocks = cfg, weights, globals_, kv, blocks
        self.mlp_rows, self.device, self.dtype = mlp_rows, device, compute_dtype
        self.inv_freq = rope_frequencies(cfg).to(device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, chunks: list[list[Piece]], logit_rows: list[int]) -> torch.Tensor:
        """Run every chunk of the batch through each layer in turn; return float32 logits of `logit_rows`.

        Within a layer the chunks go in order, so a prefill chunk sees the KV its predecessors just wrote.
        """
        pieces = [p for chunk in chunks for p in chunk]
        lengths = [p.rows.stop - p.rows.start for p in pieces]
        positions = torch.cat([torch.arange(p.start, p.start + n) for p, n in zip(pieces, lengths)])
        slots = [self.blocks.slots(p.seq, p.start, n) for p, n in zip(pieces, lengths)]
        block_ids = [b for s in slots for b in s[0]]
        offsets = [o for s in slots for o in s[1]]
        cos, sin = rope_tables(self.inv_freq, positions.to(self.device), self.dtype)

        h = self.globals.embed_tokens(tokens.to(self.device))
        narrow = len(tokens) < NARROW_ROWS
        for i in range(self.cfg.num_layers):
            w = self.weights.layer(i, narrow)
            for chunk in chunks:
                r = slice(chunk[0].rows.start, chunk[-1].rows.stop)
                h[r] = self.decoder_layer(i, w, h[r], chunk, positions[r], cos[r], sin[r],
                                          block_ids[r], offsets[r])
        x = rms_norm(h[logit_rows], self.globals.norm, self.cfg.rms_norm_eps)
        return self.globals.logits(x, len(logit_rows) < NARROW_ROWS)

    def decoder_layer(self, i, w, x, pieces, pos, cos, sin, block_ids, offsets) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        a = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
        q = linear(a, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")).view(t, cfg.num_heads, -1)
        k = linear(a, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")).view(t, cfg.num_kv_heads, -1)
        v = linear(a, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")).view(t, cfg.num_kv_heads, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.kv.write(i, block_ids, offsets, k, v)
        if self.kv.dtype != self.dtype:  # attend to what the cache keeps, so where chunks split changes nothing
            k, v = k.to(self.kv.dtype).to(self.dtype), v.to(self.kv.dtype).to(self.dtype)

        attn = torch.empty_like(q)
        first = pieces[0].rows.start
        for p in pieces:
            r = slice(p.rows.start - first, p.rows.stop - first)
            cached = self.kv.read(i, self.blocks.tables[p.seq], p.start)
            attn[r] = chunked_attention(q[r], k[r], v[r], pos[r], cached, cfg.head_dim ** -0.5, cfg.sliding_window)
        x = x + linear(attn.view(t, -1), w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        return x + mlp(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w, self.mlp_rows)
