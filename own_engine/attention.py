"""Attention over KV that arrives in chunks, merged with log-sum-exp (online softmax), so a layer's whole KV
never has to be on the device at once. Handles GQA, causal masking and an optional sliding window.

Each chunk goes through a fused kernel (kernels.py); `attend` is the plain-PyTorch definition the tests
compare the kernels against. Decoding sequences whose KV is small and read in place attend together, over one
gather of their KV (KVCache.gather_index), through one kernel call masked per sequence (`gathered_bias`).
"""
from collections.abc import Callable, Iterable
from typing import Literal, overload

import torch

from .kernels import fused_attention

CachedKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a chunk's k, v [t, Hkv, D] and positions [t] (CPU)
# fused_attention's signature: (q, k, v, causal, bias, scale) -> (out, lse); native.PrefillAttention takes its place
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.Tensor | None, float],
                  tuple[torch.Tensor, torch.Tensor]]


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk] mask of the keys each query may attend to."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: softmax attention of q [Tq, H, D] over one chunk k, v [Tk, Hkv, D], with the whole score matrix.

    Returns the output normalised within the chunk (float32, [Tq, H, D]) and its log-sum-exp ([Tq, H]);
    rows with no visible key get output 0 and lse -inf.
    """
    tq, h, d = q.shape
    tk, hkv, _ = k.shape
    g = h // hkv  # query heads j*g .. j*g+g-1 share KV head j, as in HF's repeat_kv
    qg = q.float().view(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)).mul_(scale).view(hkv, g, tq, tk)
    scores.masked_fill_(~mask, float("-inf"))
    lse = scores.logsumexp(-1)  # [hkv, g, tq]
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))
    out = torch.bmm(probs.view(hkv, g * tq, tk), v.float().transpose(0, 1))
    return out.view(hkv, g, tq, d).permute(2, 0, 1, 3).reshape(tq, h, d), lse.permute(2, 0, 1).reshape(tq, h)


def merge(out: torch.Tensor, lse: torch.Tensor, out2: torch.Tensor,
          lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (outputs upcast to float32); the first must have a
    finite lse everywhere."""
    new = torch.logaddexp(lse, lse2)
    out = out.float() * torch.exp(lse - new).unsqueeze(-1) + out2.float() * torch.exp(lse2 - new).unsqueeze(-1)
    return out, new


# The causal part is of the new tokens over themselves: each query sees its own key, so no window hides it.
@overload
def part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
         window: int | None, causal: Literal[True], kernel: Kernel = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
         window: int | None, causal: bool, kernel: Kernel = ...) -> tuple[torch.Tensor, torch.Tensor] | None: ...


def part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
         window: int | None, causal: bool,
         kernel: Kernel = fused_attention) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of q over one chunk through the fused kernel (`kernel`: fused_attention or ours): (out in q's
    dtype, lse), or None when the sliding window hides the whole chunk. Positions are CPU tensors; a mask is built
    only for a chunk the window cuts through."""
    bias, empty = None, None
    if window is not None and int(k_pos.min()) <= int(q_pos.max()) - window:
        if int(k_pos.max()) <= int(q_pos.min()) - window:
            return None
        keep = visible(q_pos, k_pos, window)  # causality included, so the kernel need not add it
        bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, float("-inf")).to(q.device)
        empty, causal = ~keep.any(1).to(q.device), False
    out, lse = kernel(q, k, v, causal, bias, scale)
    if empty is not None:
        out, lse = out.masked_fill(empty[:, None, None], 0), lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


def combine(first: tuple[torch.Tensor, torch.Tensor],
            rest: Iterable[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """Merge partial attentions (None: a chunk the window hid) into the output, in the first's dtype; a single
    part is returned as the kernel gave it, with no float32 round trip."""
    out, lse = first
    dtype = out.dtype
    for other in rest:
        if other is not None:
            out, lse = merge(out, lse, *other)
    return out.to(dtype)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, cached: Iterable[CachedKV],
                      scale: float, window: int | None = None, kernel: Kernel = fused_attention,
                      q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new tokens over themselves (causal) and over cached KV chunks.

    q [T, H, D], k/v [T, Hkv, D] at positions pos [T] (a CPU tensor); `cached` yields (k, v, positions) of earlier
    tokens, positions on the CPU. Or q of the last new token alone (q_pos: its position), which sees every new key.
    Starting from the new tokens' own part keeps the running lse finite (each query sees itself).
    """
    q_pos = pos if q_pos is None else q_pos
    return combine(part(q, k, v, q_pos, pos, scale, window, True, kernel),
                   (part(q, ck, cv, q_pos, cpos, scale, window, False, kernel) for ck, cv, cpos in cached))


def joined_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: Iterable[CachedKV], cached_len: int,
                     scale: float, kernel: Kernel) -> torch.Tensor:
    """chunked_attention with no window, in one call of a kernel whose causality is aligned at the keys' end
    (native.PrefillAttention: query i of Tq sees keys up to i + Tk - Tq): the cached chunks (cached_len keys, all
    before the new tokens) copied ahead of the new keys, so no partial attentions are merged."""
    if not cached_len:
        return kernel(q, k, v, True, None, scale)[0]
    t = k.shape[0]
    keys, values = k.new_empty(cached_len + t, *k.shape[1:]), v.new_empty(cached_len + t, *v.shape[1:])
    row = 0
    for ck, cv, _ in cached:  # each chunk is valid only until the next is read: copied as it comes
        keys[row:row + len(ck)], values[row:row + len(cv)] = ck, cv
        row += len(ck)
    keys[row:], values[row:] = k, v
    return kernel(q, keys, values, True, None, scale)[0]


def cached_attention(q: torch.Tensor, pos: torch.Tensor, cached: Iterable[CachedKV], scale: float,
                     window: int | None = None) -> torch.Tensor:
    """Attention of one new token (q [1, H, D] at pos [1]) over cached KV chunks that already hold its own K and V
    (decode: the layer writes before it reads): no causal part of its own and, when its KV is one chunk, no merge.
    A chunk the window does not hide wholly has a key the token sees (every cached key is at or before it), so the
    first part kept starts the merge with a finite lse."""
    parts = (part(q, ck, cv, pos, cpos, scale, window, causal=False) for ck, cv, cpos in cached)
    first = next(p for p in parts if p is not None)
    return combine(first, parts)


def gathered_bias(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The additive mask [B, 1, 1, T] of gathered keys at key_pos [B, T] (-1: padding) for one new token per
    sequence at q_pos [B]: every real key is at or before its token; the window hides the older ones."""
    keep = key_pos >= 0
    if window is not None:
        keep &= key_pos > q_pos[:, None] - window
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
    return bias[:, None, None].to(device)

