"""Fused attention kernels that also return the log-sum-exp, so attention over KV chunks merges exactly.

CPU: PyTorch's flash kernel for CPU (blocked online softmax, GQA, causal, additive mask; never builds the score
matrix). CUDA: the memory-efficient kernel, which takes every dtype and an additive bias (flash takes no mask).
Without a mask or causality, the query heads sharing a KV head are folded into that head's query rows: each KV
head is read once for its whole group (and the CUDA kernel, which wants as many KV heads as query heads, needs no
expanded copy). `decode_attention` runs one decoded token of each of several sequences in one call (CPU).
"""
import torch
import torch.nn.functional as F


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, bias: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, H, D], k and v [Tk, Hkv, D] (Tk > 0; the CPU kernel divides by zero on an empty chunk), any strides
    with a contiguous last dim. causal: query i sees keys 0..i (only meaningful with Tq == Tk). bias: additive
    [Tq, Tk] in q's dtype (-inf hides a key). Returns out [Tq, H, D] in q's dtype and lse [Tq, H] float32;
    a row whose keys are all hidden gets an unspecified lse (the caller knows those rows)."""
    tq, h, d = q.shape
    hkv, causal = k.shape[1], causal and tq > 1
    kt, vt = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    fold = not causal and bias is None
    if fold:  # [1, Hkv, g * Tq, D], rows ordered (query head in group, token)
        qt = q.view(tq, hkv, h // hkv, d).permute(1, 2, 0, 3).reshape(1, hkv, -1, d)
    else:
        qt = q.transpose(0, 1).unsqueeze(0)
    out, lse = _kernel(qt, kt, vt, causal, bias, scale)
    if fold:
        return (out.view(hkv, h // hkv, tq, d).permute(2, 0, 1, 3).reshape(tq, h, d),
                lse.view(hkv, h // hkv, tq).permute(2, 0, 1).reshape(tq, h))
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, bias: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, H, Tq, D], k and v [1, Hkv, Tk, D] -> out [1, H, Tq, D], lse [1, H, Tq]."""
    out: torch.Tensor  # torch.ops calls are untyped: what the aten schemas return
    lse: torch.Tensor
    if q.device.type != "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                              scale=scale)
        return out, lse
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if bias is not None:  # it reads bias rows at a 16-element alignment, as SDPA's own call pads them
        bias = F.pad(bias, (0, -bias.shape[-1] % 16))[:, :bias.shape[-1]].expand(1, q.shape[1], -1, -1)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                                       scale=scale)[:2]
    return out, lse[..., :q.shape[2]]  # lse rows are padded to a multiple of 32


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One new token per sequence: q [B, H, D] over k, v [B, T, Hkv, D] with an additive bias [B, 1, 1, T] (-inf
    hides a key: padding, the window), on the CPU. The heads sharing a KV head are folded into its rows, as each
    sequence has one query row; every sequence must see at least one key. Returns out [B, H, D] in q's dtype."""
    b, h, d = q.shape
    hkv = k.shape[2]
    out: torch.Tensor  # torch.ops calls are untyped: what the aten schema returns
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(b, hkv, h // hkv, d), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=bias, scale=scale)
    return out.reshape(b, h, d)
