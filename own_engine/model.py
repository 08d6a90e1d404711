"""The Llama-family decoder, run layer by layer over a batch so each layer's weights are needed only once
per forward pass however many prefill chunks or sequences the batch holds. Activations are in the compute dtype."""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .attention import cached_attention, chunked_attention, gathered_bias, joined_attention
from .batch import Batch, Piece
from .config import ModelConfig
from .kernels import decode_attention, fused_attention
from .kv_cache import Gather, KVCache, Paged, Slot
from .matmul import linear
from .native import DecodeLayer, LayerOps, PagedAttention, PrefillAttention
from .placement import Globals, LayerWeights
from .planner import padded


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, rounded to x's dtype, then scaled by the weight (torch's
    rms_norm computes a narrower x in float32 itself and rounds its result to x's dtype)."""
    if x.dtype == weight.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, eps)  # the same products, in one call
    return weight * torch.rms_norm(x, weight.shape, None, eps)


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


class Rope:
    """cos and sin of positions [T, head_dim], looked up in tables computed in float32 as transformers does and kept
    in the compute dtype, grown (doubled) when a pass reaches past them. sin comes with its first half negated, so
    rotating is x * cos + swap_halves(x) * sin, the products transformers' rotate_half makes."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.inv_freq, self.device, self.dtype = rope_frequencies(cfg).to(device), device, dtype
        self.cos = self.sin = torch.empty(0, cfg.head_dim, dtype=dtype, device=device)

    def tables(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of `positions` (a CPU tensor, all below `end`)."""
        if end > len(self.cos):
            n = max(end, 2 * len(self.cos), 256)
            freqs = torch.arange(n, device=self.device).float()[:, None] * self.inv_freq[None, :]
            angles = torch.cat((freqs, freqs), -1)
            half = freqs.shape[1]
            self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
            self.sin[:, :half].neg_()
        index = positions.to(self.device)
        return self.cos[index], self.sin[index]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim] from Rope.tables."""
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat((x2, x1), -1) * sin[:, None]


# The forms whose product of adjacent weights (weights.fused) gives each output exactly as their separate products:
# memory-bound row by row. F.linear's GEMM blocks by the matrix's size, so a fused product differs in the last bits
# (and placements whose weights lie apart, a checkpoint mapped in place, would compute otherwise than resident ones).
EXACT_FUSED = ("gemv", "wxt", "tiles")

# The decoding pieces of a chunk that attend together (Transformer.gathered): their indices among the pieces, their
# rows in the chunk, and where our kernel reads their KV, or the gather of their KV and its mask.
Gathered = tuple[set[int], slice | torch.Tensor, Paged | tuple[Gather, torch.Tensor]]

# A chunk's hidden state between layers: x + y, where y (the MLP's output, None once added) is added by the next
# layer's input RMSNorm in the same pass (Transformer.add_norm).
Hidden = tuple[torch.Tensor, torch.Tensor | None]

# A prefill chunk attends over its cached keys and its own in one call of our kernel (attention.joined_attention)
# while they take at most this much (K and V of one layer, copied together): 8,192 tokens of 4 KV heads of 64 are
# 8 MiB. A longer context attends chunk by chunk, merged, as on CUDA.
JOIN_BYTES = 64 << 20


def mlp(x: torch.Tensor, w: dict[str, torch.Tensor], rows: int, form: str,
        ops: LayerOps | None = None) -> torch.Tensor:
    """SwiGLU, `rows` rows at a time so the [rows, intermediate] activations stay bounded; silu(gate) * up in one
    pass where `ops` are ours."""
    if len(x) > rows:
        out = torch.empty_like(x)
        for r in range(0, len(x), rows):
            out[r:r + rows] = mlp(x[r:r + rows], w, rows, form, ops)
        return out
    if "gate_up" in w and form in EXACT_FUSED:  # gate and up adjacent in memory: one product (weights.fused)
        gate_up = linear(x, w["gate_up"], None, form)
        gate, up = gate_up.chunk(2, -1)
    else:
        gate, up = linear(x, w["mlp.gate_proj.weight"], None, form), linear(x, w["mlp.up_proj.weight"], None, form)
    return linear(ops.silu_mul(gate, up) if ops else F.silu(gate) * up, w["mlp.down_proj.weight"], None, form)


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: LayerWeights, globals_: Globals, kv: KVCache, mlp_rows: int,
                 narrow_rows: int, device: torch.device, compute_dtype: torch.dtype,
                 forms: Callable[[torch.dtype, int], str], paged: PagedAttention | None = None,
                 ops: LayerOps | None = None, prefill: PrefillAttention | None = None, pad_rows: int = 0,
                 decode: DecodeLayer | None = None) -> None:
        """narrow_rows: passes of fewer rows multiply by the weights as stored (compute.Compute.narrow_rows);
        forms(dtype, rows): how a product of that many rows is computed (compute.Compute.form); paged: our kernel,
        where decode attention runs in it, ops: ours, where a layer's elementwise steps run in them, prefill: ours,
        where a prefill chunk's attention runs in it (native.py); pad_rows: a chunk whose products go through
        F.linear runs its products, norms and MLP on zero rows up to a multiple of this (planner.Plan.pad_rows);
        decode: ours, where a layer of decoding rows may run in two calls (native.DecodeLayer, decoder_layer)."""
        self.cfg, self.weights, self.globals, self.kv, self.paged, self.ops = cfg, weights, globals_, kv, paged, ops
        self.pad_rows = pad_rows
        self.mlp_rows, self.narrow_rows, self.device, self.dtype = mlp_rows, narrow_rows, device, compute_dtype
        self.forms, self.rope, self.prefill = forms, Rope(cfg, device, compute_dtype), prefill or fused_attention
        self.join_tokens = JOIN_BYTES // cfg.kv_bytes_per_token(compute_dtype) if prefill else 0
        self.qk_columns = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim  # q's and k's columns of qkv
        self.decode = decode

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Run every chunk of the batch through each layer in turn; return float32 logits of its logit rows.

        Within a layer the chunks go in order, so a prefill chunk sees the KV its predecessors just wrote.
        What a chunk needs besides the weights (rope rows, KV slots, matmul forms) is worked out once per pass.
        """
        narrow = len(batch) < self.narrow_rows
        weights_dtype = self.weights.layout.dtype if narrow else self.dtype
        cos, sin = self.rope.tables(batch.positions, batch.end)
        chunks, wide = [], []
        for pieces in batch.chunks:
            r = slice(pieces[0].rows.start, pieces[-1].rows.stop)
            form = self.forms(weights_dtype, r.stop - r.start)
            chunks.append((r, (pieces, batch.positions[r], cos[r], sin[r],
                               self.kv.slots(batch.block_ids[r], batch.offsets[r]), form, self.gathered(pieces))))
            wide.append(padded(r.stop - r.start, self.pad_rows if form == "linear" else 0))
        h = self.globals.embed_tokens(batch.tokens.to(self.device))
        # Each chunk's rows, with zero rows after them up to its width (pad_rows).
        hs = [h[r] if n == r.stop - r.start else torch.cat((h[r], h.new_zeros(n - (r.stop - r.start), h.shape[1])))
              for (r, _), n in zip(chunks, wide)]
        states: list[Hidden] = [(x, None) for x in hs]
        last = self.cfg.num_layers - 1
        for i in range(last):
            w = self.weights.layer(i, narrow)
            states = [self.decoder_layer(i, w, x, y, *chunk) for (x, y), (_, chunk) in zip(states, chunks)]
        # The last layer's outputs are wanted at the logit rows only; its K and V at every row. A prompt's other rows
        # skip their attention, o_proj and MLP there (llama.cpp's last layer drops them before its FFN).
        w = self.weights.layer(last, narrow)
        outputs = [[j - r.start for j in batch.logit_rows if r.start <= j < r.stop] for r, _ in chunks]
        ends = [self.decoder_layer(last, w, x, y, *chunk, outputs=out)
                for (x, y), (_, chunk), out in zip(states, chunks, outputs)]
        h = torch.cat([(x if y is None else x + y)[:len(out)] for (x, y), out in zip(ends, outputs)])
        x = self.norm(h, self.globals.norm)
        rows = len(batch.logit_rows)
        head_narrow = rows < self.narrow_rows
        return self.globals.logits(x, head_narrow, self.forms(self.globals.lm_head.dtype if head_narrow else self.dtype,
                                                              rows))

    def build_products(self, rows: int) -> None:
        """Each of a layer's products once, on `rows` zero rows and zero weights of its shapes, so that oneDNN
        builds its kernels for that width at load rather than in the first prompt that needs them."""
        shapes = self.weights.layout.tensors
        built = set()
        for name, (_, shape) in shapes.items():
            bias = shapes[b][1] if (b := name.removesuffix("weight") + "bias") in shapes else None
            if name.endswith(".weight") and len(shape) == 2 and (shape, bias) not in built:
                built.add((shape, bias))
                linear(torch.zeros(rows, shape[1], dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device),
                       None if bias is None else torch.zeros(bias, dtype=self.dtype, device=self.device))

    def gathered(self, pieces: list[Piece]) -> Gathered | None:
        """For a chunk's decoding pieces that attend in one call: (their indices among the pieces, their rows in the
        chunk, and where our kernel reads their KV (KVCache.paged_index) or, for two or more, one gather of it
        (KVCache.gather_index) and its mask); None where they attend apart."""
        decode = [j for j, p in enumerate(pieces) if p.own]
        reads = [pieces[j].cached for j in decode]
        kv: Paged | tuple[Gather, torch.Tensor] | None = self.kv.paged_index(reads) if self.paged and decode else None
        if kv is None and len(decode) > 1 and (g := self.kv.gather_index(reads)) is not None:
            kv = g, gathered_bias(torch.tensor([pieces[j].start for j in decode]), g.positions,
                                  self.cfg.sliding_window, self.dtype, self.device)
        if kv is None:
            return None
        first, starts = pieces[0].rows.start, [pieces[j].rows.start for j in decode]
        rows = starts[0] - first
        rows = slice(rows, rows + len(decode)) if starts == list(range(starts[0], starts[0] + len(decode))) else (
            torch.tensor(starts, device=self.device) - first)
        return set(decode), rows, kv

    def decoder_layer(self, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor | None,
                      pieces: list[Piece], pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: list[Slot],
                      form: str, gathered: Gathered | None, outputs: list[int] | None = None) -> Hidden:
        """The layer's output (Hidden: x + y) at every row of the chunk, or only at `outputs` (its rows,
        ascending), where every row still writes its K and V: a prefill piece then attends from its last row alone,
        where that is one of them, and not at all otherwise. x may have zero rows after the chunk's (forward:
        pad_rows): its products, norms and MLP run on them too, and its output has them unless `outputs` picks
        rows."""
        cfg, t = self.cfg, len(pos)
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.decode is not None and self.decodes_natively(w, x, t, pieces, form, gathered, outputs):
            assert gathered is not None and isinstance(gathered[2], Paged)  # decodes_natively checked
            x = x if y is None else x + y
            qkv, qk = self.decode.head(x, w["input_layernorm.weight"], cfg.rms_norm_eps, w["qkv"], w.get("qkv_bias"),
                                       cos, sin, heads + kv_heads, d)
            self.kv.write(i, slots, qk[:, heads:], qkv[:, self.qk_columns:].reshape(t, kv_heads, d))
            paged = gathered[2]
            return self.decode.tail(qk, heads, *self.kv.paged_pools(i, paged), paged.tables, paged.lengths,
                                    self.kv.block_size, cfg.sliding_window, d ** -0.5, x,
                                    w["self_attn.o_proj.weight"], w["post_attention_layernorm.weight"],
                                    cfg.rms_norm_eps, w["gate_up"], w["mlp.down_proj.weight"]), None
        if y is None:
            a = self.norm(x, w["input_layernorm.weight"])
        else:
            x, a = self.add_norm(x, y, w["input_layernorm.weight"])
        if "qkv" in w and form in EXACT_FUSED:  # q, k and v adjacent: one product, one rotation of q and k
            qkv = linear(a, w["qkv"], w.get("qkv_bias"), form)  # not F.linear: no padded rows here
            qk = self.rotate(qkv[:, :self.qk_columns].reshape(t, heads + kv_heads, d), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, self.qk_columns:].reshape(t, kv_heads, d)
        else:
            q, k, v = (linear(a, w[f"self_attn.{n}_proj.weight"], w.get(f"self_attn.{n}_proj.bias"), form)[:t]
                       .reshape(t, -1, d) for n in "qkv")
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        self.kv.write(i, slots, k, v)
        if outputs == []:
            return x[:0], None
        if self.kv.dtype != self.dtype:  # attend to what the cache keeps, so where chunks split changes nothing
            k, v = k.to(self.kv.dtype).to(self.dtype), v.to(self.kv.dtype).to(self.dtype)

        first, scale = pieces[0].rows.start, d ** -0.5
        keep = outputs if outputs is not None and len(outputs) < t else None
        attn = torch.empty(t, heads, d, dtype=q.dtype, device=q.device) if len(pieces) > 1 or keep is not None else None
        together: set[int] = set()
        if gathered is not None:  # the decoding sequences at once: where their KV lies, or over one gather of it
            together, rows, kv = gathered
            if isinstance(kv, Paged):
                assert self.paged is not None  # paged_index is asked only then
                out = self.paged(q[rows], *self.kv.paged_pools(i, kv), kv.tables, kv.lengths, self.kv.block_size,
                                 cfg.sliding_window, scale)
            else:
                out = decode_attention(q[rows], *self.kv.gather(i, kv[0]), kv[1], scale)
            if len(together) == len(pieces):
                attn = out
            else:  # attn was made: some pieces attend apart, so there are several
                attn[rows] = out  # type: ignore[index]
        for j, p in enumerate(pieces):
            if j in together:
                continue
            r = slice(p.rows.start - first, p.rows.stop - first)
            qr = r  # the rows that attend: a decoding piece's row is always wanted
            if keep is not None and not p.own:
                if r.stop - 1 not in keep:
                    continue
                qr = slice(r.stop - 1, r.stop)
            cached = self.kv.read(i, p.cached)
            if p.own:
                out = cached_attention(q[r], pos[r], cached, scale, cfg.sliding_window)
            else:
                cached_len = sum(c.valid for c in p.cached)
                if cfg.sliding_window is None and cached_len + len(pos[r]) <= self.join_tokens:
                    out = joined_attention(q[qr], k[r], v[r], cached, cached_len, scale, self.prefill)
                else:
                    out = chunked_attention(q[qr], k[r], v[r], pos[r], cached, scale, cfg.sliding_window,
                                            self.prefill, q_pos=pos[qr])
            if attn is None:
                attn = out
            else:
                attn[qr] = out
        # attn is set: by the gather, or by the pieces (there is at least one)
        if keep is not None and attn is not None:
            x, attn, t = x[keep], attn[keep], len(keep)
            form = self.forms(w["self_attn.o_proj.weight"].dtype, t)
        elif len(x) > t and attn is not None:  # o_proj's product over the padded rows too
            attn, t = torch.cat((attn, attn.new_zeros(len(x) - t, heads, d))), len(x)
        o = linear(attn.reshape(t, -1),  # type: ignore[union-attr]
                   w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"), form)
        x, a = self.add_norm(x, o, w["post_attention_layernorm.weight"])
        return x, mlp(a, w, self.mlp_rows, form, self.ops)  # the next RMSNorm adds them (add_norm)

    def decodes_natively(self, w: dict[str, torch.Tensor], x: torch.Tensor, t: int, pieces: list[Piece], form: str,
                         gathered: Gathered | None, outputs: list[int] | None) -> bool:
        """Whether this layer of a chunk runs in native.DecodeLayer's two calls: every piece decoding, attending
        together where its KV lies (one tier, in the compute dtype), every row wanted, products in the tile kernel
        over fused qkv and gate_up weights in bf16, no bias but qkv's, shapes the tile kernel takes."""
        if gathered is None or not isinstance(gathered[2], Paged) or gathered[1] != slice(0, len(pieces)):
            return False
        if outputs is not None and len(outputs) < t or len(x) != t or form != "tiles" or not x.is_contiguous():
            return False
        if "qkv" not in w or "gate_up" not in w or "self_attn.o_proj.bias" in w:
            return False
        names = ("qkv", "gate_up", "self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight", *(["qkv_bias"] if "qkv_bias" in w else []))
        if x.dtype != torch.bfloat16 or self.kv.dtype != x.dtype or any(w[n].dtype != x.dtype for n in names):
            return False
        cfg = self.cfg
        return all(v % 32 == 0 for v in (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim))

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        return self.ops.rms_norm(x, weight, eps) if self.ops else rms_norm(x, weight, eps)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x + y and its RMSNorm, in one pass over them where the ops are ours (y: a product's output, overwritten
        there)."""
        if self.ops:
            return self.ops.add_rms_norm(x, y, weight, self.cfg.rms_norm_eps)
        x = x + y
        return x, self.norm(x, weight)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.ops.rope(x, cos, sin) if self.ops else apply_rope(x, cos, sin)
