"""Grouped-query self-attention and the attention-backend seam.

A backend is a function `(q, k, v, mask, scale) -> out` with q (B, H, T, D), k/v (B, Hkv, L, D) and mask
(B, 1, T, L) bool or None for causal. SDPA is the default; chunked and sequence-parallel backends register
here with `@register_attention_backend` and are selected per model with `model.set_attention_backend(name)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.kv.base import KVCache
from llamalab.model.linear import FusedLinears, Linear
from llamalab.model.rope import apply_rope

AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor
]
_BACKENDS: dict[str, AttentionBackend] = {}


def register_attention_backend(name: str) -> Callable[[AttentionBackend], AttentionBackend]:
    """Register an attention implementation under `name`."""

    def wrap(fn: AttentionBackend) -> AttentionBackend:
        _BACKENDS[name] = fn
        return fn

    return wrap


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        from llamalab.errors import LlamalabError

        raise LlamalabError(f"unknown attention backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


@register_attention_backend("sdpa")
def sdpa_attention(q, k, v, mask, scale):
    T = q.shape[2]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and T > 1,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


class Attention(nn.Module):
    """LLaMA self-attention: q/k/v/o projections (HF names), RoPE, GQA, a pluggable backend."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.scale = self.head_dim**-0.5
        self.backend: AttentionBackend = sdpa_attention
        self.qkv: FusedLinears | None = None

    def fuse(self) -> None:
        """Run q/k/v as one matmul at inference (see FusedLinears)."""
        self.qkv = FusedLinears(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        rows: list[int] | None = None,
        starts: list[int] | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        projections = (self.q_proj, self.k_proj, self.v_proj)
        qkv = self.qkv(x, projections) if self.qkv else torch.cat([m(x) for m in projections], dim=-1)
        qkv = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H+2Hkv, T, D)
        qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # q and k heads rotated in one pass
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]  # (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v, rows, starts)  # (B, Hkv, L, D)
        out = self.backend(q, k, v, mask, self.scale)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
