"""Attention of a pass's new tokens over a position-indexed past, shared by the compressed caches.

A compressed cache rebuilds (or reads) its past keys and values for the rows of a pass as one transient
(B, Hkv, P, D) tensor in which slot p holds position p (rows shorter than P are padded and masked), then the
pass's own keys and values go at their positions: every method here keeps each past position (none evicts),
so attention is the causal mask over positions, as in the dense cache.
"""

from __future__ import annotations

import torch

from llamalab.kv.base import AttentionFn


def causal_mask(starts: list[int], T: int, end: int, device) -> torch.Tensor:
    """(B, 1, T, end) bool: the query at position starts[b] + t sees keys at positions <= its own."""
    q_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
    k_pos = torch.arange(end, device=device)
    return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]


def with_new(past: torch.Tensor | None, new: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Keys (or values) at positions 0..max(starts)+T-1: the past (B, Hkv, >= max(starts), D), or None when
    no row has one, with `new` (B, Hkv, T, D) written at each row's start."""
    B, H, T, D = new.shape
    s0 = starts[0]
    if past is None or max(starts) == 0:
        return new
    if all(s == s0 for s in starts):
        return torch.cat([past[:, :, :s0], new], 2)
    out = new.new_zeros(B, H, max(starts) + T, D)
    out[:, :, : past.shape[2]] = past[:, :, : out.shape[2]]
    for b, s in enumerate(starts):
        out[b, :, s : s + T] = new[b]
    return out


def attend_over(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor | None,
    past_v: torch.Tensor | None,
    starts: list[int],
    attention: AttentionFn,
) -> torch.Tensor:
    """Attention of rotated q (B, H, T, D) over the past and the pass's own rotated k / v (B, Hkv, T, D)."""
    T = k.shape[2]
    keys, values = with_new(past_k, k, starts), with_new(past_v, v, starts)
    end = keys.shape[2]
    if end == T or (T == 1 and len(set(starts)) == 1):
        return attention(q, keys, values, None)  # a fresh prefill (plain causal) or one token per row
    return attention(q, keys, values, causal_mask(starts, T, end, q.device))
