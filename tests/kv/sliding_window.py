"""A KV-cache method written against the seam, for the seam's tests: StreamingLLM's cache (Xiao et al.,
"Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453) keeps the first `sinks`
positions of each sequence and the last `window`, so it holds fewer slots than positions. It overrides
`attend` (the queries of a chunk see the kept slots and the chunk itself through a position mask), keeps
nothing it does not need, and reports the bytes it holds.

`window_backend` is the slow, obviously correct reference: full attention over the whole sequence with the
same position mask, registered as an attention backend for a forward pass without a cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamalab.kv.base import KVCache
from llamalab.kv.registry import register_kv_cache
from llamalab.model.attention import register_attention_backend

SINKS, WINDOW = 4, 16


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """(Tq, Tk) bool: query at position p sees key j iff j <= p and (j is a sink or within the window)."""
    q, k = q_pos[:, None], k_pos[None, :]
    return (k <= q) & ((k < sinks) | (k > q - window))


class SlidingWindowCache(KVCache):
    def __init__(self, n_layers: int, max_batch: int, max_len: int, sinks: int, window: int) -> None:
        self.max_batch, self.max_len, self.sinks, self.window = max_batch, max_len, sinks, window
        # per layer, per row: kept keys and values (Hkv, S, D) and their positions (S,)
        self.slots: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]] = [
            [None] * max_batch for _ in range(n_layers)
        ]

    def attend(self, layer, q, k, v, ctx, attention):
        q, k = ctx.rotate(q), ctx.rotate(k)
        T, outs = k.shape[2], []
        for b, (row, start) in enumerate(zip(ctx.rows, ctx.starts)):
            new_pos = torch.arange(start, start + T)
            kept = self.slots[layer][row]
            if start == 0 or kept is None:
                keys, values, pos = k[b], v[b], new_pos
            else:
                keys, values, pos = (
                    torch.cat([kept[0], k[b]], 1),
                    torch.cat([kept[1], v[b]], 1),
                    torch.cat([kept[2], new_pos]),
                )
            mask = visible(new_pos, pos, self.sinks, self.window)
            outs.append(attention(q[b : b + 1], keys[None], values[None], mask[None, None]))
            # Later queries (at start + T or after) need only sinks and the last `window` positions.
            keep = (pos < self.sinks) | (pos > start + T - 1 - self.window)
            self.slots[layer][row] = (keys[:, keep].clone(), values[:, keep].clone(), pos[keep])
        return torch.cat(outs)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for layer in self.slots for kept in layer if kept for t in kept[:2]
        )

    def reset(self, rows=None) -> None:
        for layer in self.slots:
            for row in range(self.max_batch) if rows is None else rows:
                layer[row] = None


@register_kv_cache("sliding-window")
def sliding_window_cache(spec, config, max_len, max_batch, dtype, device) -> SlidingWindowCache:
    spec.refuse_settings(accepted=("sinks", "window"))
    sinks, window = int(spec.args.get("sinks", SINKS)), int(spec.args.get("window", WINDOW))
    return SlidingWindowCache(config.num_hidden_layers, max_batch, max_len, sinks, window)


@register_attention_backend("test-sliding-window")
def window_backend(q, k, v, mask, scale, is_causal):
    assert mask is None, "the reference runs whole sequences without a cache"
    pos = torch.arange(q.shape[2])
    window_mask = visible(pos, pos, SINKS, WINDOW)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=window_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
