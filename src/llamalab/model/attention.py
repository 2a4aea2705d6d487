"""Grouped-query self-attention, what one forward pass tells it (`AttnContext`), and the backend seam.

A backend is a function `(q, k, v, mask, scale, is_causal) -> out` with q (B, H, T, D), k/v (B, Hkv, L, D)
and mask (B, 1, T, L) bool (True = may attend) or None; `is_causal` applies only without a mask. SDPA is the
default; chunked and sequence-parallel backends register here with `@register_attention_backend` and are
selected per model with `model.set_attention_backend(name)`.

With a KV cache, attention hands its queries, keys and values to `cache.attend` (see `llamalab.kv.base`):
the cache decides what is stored and what attention reads, so KV-cache methods need no change here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llamalab.errors import LlamalabError
from llamalab.model.linear import Fusable, FusedLinear, Linear, LinearGroup, native_tensors
from llamalab.model.rope import apply_rope

if TYPE_CHECKING:
    from llamalab.kv.base import KVCache

AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool], torch.Tensor
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
        raise LlamalabError(f"unknown attention backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


@register_attention_backend("sdpa")
def sdpa_attention(q, k, v, mask, scale, is_causal):
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and is_causal and q.shape[2] > 1,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


@dataclass
class AttnContext:
    """What every layer of one forward pass shares: RoPE at the tokens' positions, how tokens may attend to
    each other, and the KV cache rows they read and write.

    Without a cache, attention is causal over the pass's tokens (or bidirectional when `causal` is False),
    restricted to tokens of the same document where `doc_ids` (B, T) is given (packed training sequences).
    With a cache, the tokens of batch row b sit at positions `starts[b]..` of cache row `rows[b]`.
    """

    cos: torch.Tensor  # (B, T, D)
    sin: torch.Tensor  # (B, T, D)
    cache: KVCache | None = None
    rows: list[int] | None = None
    starts: list[int] | None = None
    doc_ids: torch.Tensor | None = None  # (B, T)
    causal: bool = True
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, heads, T, D) rotated by RoPE at this pass's positions."""
        return apply_rope(x, self.cos, self.sin)

    @property
    def mask(self) -> torch.Tensor | None:
        """The (B, 1, T, T) mask of a cache-less pass, or None where SDPA's own causal (or full) attention
        is exact: without document ids, the fast path is kept. Built once per pass, shared by every layer."""
        if self.doc_ids is None:
            return None
        if self._mask is None:
            same_doc = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
            if self.causal:
                T = self.doc_ids.shape[1]
                same_doc &= torch.ones(T, T, dtype=torch.bool, device=same_doc.device).tril()
            self._mask = same_doc[:, None]
        return self._mask


class Attention(Fusable):
    """LLaMA self-attention: q/k/v/o projections (HF names), RoPE, GQA, a pluggable backend."""

    fusion = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    attribute = "self_attn"  # its name in the block (HF's)

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

    def attention(self, q, k, v, mask: torch.Tensor | None, is_causal: bool = True) -> torch.Tensor:
        """The backend on rotated q (B, H, T, D) and k/v (B, Hkv, L, D)."""
        return self.backend(q, k, v, mask, self.scale, is_causal)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.run("qkv_proj", x)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if ctx.cache is not None:
            out = ctx.cache.attend(self.layer_idx, q, k, v, ctx, self.attention)  # (B, H, T, D)
        else:
            out = self.attention(ctx.rotate(q), ctx.rotate(k), v, ctx.mask, ctx.causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))

    def linear_groups(self, input_op: str) -> list[LinearGroup]:
        """q/k/v read the block's normed input; o reads attention's output, made of v's rows."""
        p = self.attribute + "."
        return [
            LinearGroup((p + "q_proj", p + "k_proj", p + "v_proj"), input_op, self.attribute),
            LinearGroup((p + "o_proj",), p + "v_proj", p + "o_proj"),
        ]

    def native_projections(self, dtype: torch.dtype) -> list[list[torch.Tensor]] | None:
        """q, k, v and o as the native decode step reads them, or None where it cannot run one of them."""
        fused = self._modules.get("qkv_proj")
        if isinstance(fused, FusedLinear):
            qkv = fused.native_parts(dtype) or [None]
        else:
            qkv = [native_tensors(getattr(self, p), dtype) for p in self.fusion["qkv_proj"]]
        out = [*qkv, native_tensors(self.o_proj, dtype)]
        return None if any(t is None for t in out) else out
