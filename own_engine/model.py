"""The Llama-family decoder, run layer by layer over a batch so each layer's weights are needed only once
per forward pass however many prefill chunks or sequences the batch holds. Activations are in the compute dtype."""
import math

import torch
import torch.nn.functional as F

from .attention import chunked_attention
from .batch import Batch, Piece
from .config import ModelConfig
from .kv_cache import KVCache
from .placement import Globals, LayerWeights


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
    """x @ w.T + b in x's dtype, reading w in its own (a narrow pass: compute.Compute.narrow_rows)."""
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
    def __init__(self, cfg: ModelConfig, weights: LayerWeights, globals_: Globals, kv: KVCache, mlp_rows: int,
                 narrow_rows: int, device: torch.device, compute_dtype: torch.dtype):
        """narrow_rows: passes of fewer rows multiply by the weights as stored (compute.Compute.narrow_rows)."""
        self.cfg, self.weights, self.globals, self.kv = cfg, weights, globals_, kv
        self.mlp_rows, self.narrow_rows, self.device, self.dtype = mlp_rows, narrow_rows, device, compute_dtype
        self.inv_freq = rope_frequencies(cfg).to(device)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Run every chunk of the batch through each layer in turn; return float32 logits of its logit rows.

        Within a layer the chunks go in order, so a prefill chunk sees the KV its predecessors just wrote.
        """
        positions = batch.positions
        cos, sin = rope_tables(self.inv_freq, positions.to(self.device), self.dtype)
        h = self.globals.embed_tokens(batch.tokens.to(self.device))
        narrow = len(batch) < self.narrow_rows
        for i in range(self.cfg.num_layers):
            w = self.weights.layer(i, narrow)
            for chunk in batch.chunks:
                r = slice(chunk[0].rows.start, chunk[-1].rows.stop)
                h[r] = self.decoder_layer(i, w, h[r], chunk, positions[r], cos[r], sin[r], batch.block_ids[r],
                                          batch.offsets[r])
        x = rms_norm(h[batch.logit_rows], self.globals.norm, self.cfg.rms_norm_eps)
        return self.globals.logits(x, len(batch.logit_rows) < self.narrow_rows)

    def decoder_layer(self, i, w, x, pieces: list[Piece], pos, cos, sin, block_ids, offsets) -> torch.Tensor:
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
            attn[r] = chunked_attention(q[r], k[r], v[r], pos[r], self.kv.read(i, p.cached), cfg.head_dim ** -0.5,
                                        cfg.sliding_window)
        x = x + linear(attn.view(t, -1), w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        return x + mlp(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w, self.mlp_rows)
