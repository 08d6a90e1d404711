"""Attention over KV that arrives in chunks, merged with log-sum-exp (online softmax), so a layer's whole KV
never has to be on the device at once. Handles GQA, causal masking and an optional sliding window."""
from collections.abc import Iterable

import torch


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk] mask of the keys each query may attend to."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def attend(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [Tq, H, D] over one chunk k, v [Tk, Hkv, D].

    Returns the output normalised within the chunk (float32, [Tq, H, D]) and its log-sum-exp ([Tq, H]);
    rows with no visible key get output 0 and lse -inf.
    """
    tq, h, d = q.shape
    tk, hkv, _ = k.shape
    g = h // hkv  # query heads j*g .. j*g+g-1 share KV head j, as in HF's repeat_kv
    qg = q.view(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)
    scores = torch.bmm(qg, k.permute(1, 2, 0)).float().mul_(scale).view(hkv, g, tq, tk)
    scores.masked_fill_(~mask, float("-inf"))
    lse = scores.logsumexp(-1)  # [hkv, g, tq]
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))
    out = torch.bmm(probs.to(v.dtype).view(hkv, g * tq, tk), v.transpose(0, 1)).float()
    return out.view(hkv, g, tq, d).permute(2, 0, 1, 3).reshape(tq, h, d), lse.permute(2, 0, 1).reshape(tq, h)


def merge(out, lse, out2, lse2) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets; the first must have a finite lse everywhere."""
    new = torch.logaddexp(lse, lse2)
    out = out * torch.exp(lse - new).unsqueeze(-1) + out2 * torch.exp(lse2 - new).unsqueeze(-1)
    return out, new


def chunked_attention(q, k, v, pos, cached: Iterable, scale: float, window: int | None = None) -> torch.Tensor:
    """Attention of new tokens over themselves (causal) and over cached KV chunks.

    q [T, H, D], k/v [T, Hkv, D] at positions pos [T]; `cached` yields (k, v, positions) of earlier tokens.
    Starting from the new tokens' own part keeps the running lse finite (each query sees itself).
    """
    out, lse = attend(q, k, v, visible(pos, pos, window), scale)
    for ck, cv, cpos in cached:
        out, lse = merge(out, lse, *attend(q, ck, cv, visible(pos, cpos, window), scale))
    return out.to(q.dtype)
