"""The KV-cache seam.

Every KV-cache method (dense, KIVI, AQUA-KV, MiniCache, DMC, H2O, ...) is a `KVCache`. Attention hands it
each layer's queries, keys and values through `attend` and gets the attention output back, so a method
decides everything between the projections and the output projection:

- `attend(layer, q, k, v, ctx, attention)`: q (B, H, T, D) and k (B, Hkv, T, D) arrive *before* RoPE
  (`ctx.rotate(x)` rotates at the pass's positions), v (B, Hkv, T, D); `attention(q, keys, values, mask)`
  is the model's backend. The default rotates q and k, stores the new keys and values with `update`, and
  runs attention over what `update` returns; a method overrides `attend` to keep keys before RoPE, hold
  fewer slots than positions, merge layers (it sees every layer in order, so it may keep cross-layer state)
  or look at the queries (attention-score based eviction).
- `update(layer, k, v, rows, starts)`: store rotated k/v and return (keys, values, mask) for attention, for
  methods that only change how keys and values are stored.
- `nbytes()`: the bytes it really holds, so a compressed cache's saving is measured, not assumed.
- `native_kv()`: the cache's storage as the native decode step reads and writes it in place (a `NativeKV`:
  a layout the kernels know, `dense` or `kivi`, its tensors and settings), or None (the default) when the
  step has no layout for it; the engine then decodes through `attend`.
- `keep_prefix(row, n)`: keep the first n positions of a row so that a new sequence sharing that prefix
  continues from them (prefix reuse); False (the default) where a method cannot truncate its state.

Rows: a cache holds up to `max_batch` independent sequences. A forward pass names the cache rows its batch
rows map to (`ctx.rows`) and where each row's new tokens start (`ctx.starts`), so that sequences of
different lengths decode together and join or leave between steps (continuous batching). Layers that are
not attention (a state-space mixer of a hybrid stack) keep their own per-row state in `state(layer)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llamalab.model.attention import AttnContext

# attention(q, keys, values, mask) -> out (B, H, T, D): the model's backend with its scale
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class NativeKV:
    """A cache's storage as the native decode step reads and writes it (llamalab/kernels/kv_layout.h).

    `layout` names the kernels' reader (`dense`, `kivi`), `tensors` lists each layer's tensors in its order
    and `settings` its integers; `dtype` is that of full-precision keys and values (the model's). The step
    writes the new tokens into the tensors; `advance(rows, starts)` then tells the cache that rows `rows`
    gained the token at `starts`, and `accepts(rows, starts)` whether the step may write there at all (a
    cache whose rows must grow in order says no to anything else, and the pass takes the PyTorch path,
    which explains what is wrong)."""

    layout: str
    tensors: list[torch.Tensor]
    dtype: torch.dtype
    settings: list[int] = field(default_factory=list)
    accepts: Callable[[list[int], list[int]], bool] = lambda rows, starts: True
    advance: Callable[[list[int], list[int]], None] = lambda rows, starts: None


class KVCache(ABC):
    """Storage of past keys/values for every layer of one model, for `max_batch` sequences."""

    max_batch: int
    max_len: int

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttnContext,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """Attention output (B, H, T, D) of `layer` for the pass's new tokens (see the module docstring)."""
        keys, values, mask = self.update(layer, ctx.rotate(k), v, ctx.rows, ctx.starts)
        return attention(ctx.rotate(q), keys, values, mask)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: list[int], starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store `k`, `v` (B, Hkv, T, D) of `layer` for batch rows mapped to cache `rows`, at positions
        `starts[b] .. starts[b]+T-1`, and return (keys, values, mask) for attention: keys/values
        (B, Hkv, L, D) and a boolean mask (B, 1, T, L) (True = may attend), or None for a plain causal
        mask over exactly the T new tokens. (A method implements this or overrides `attend`.)"""
        raise NotImplementedError(f"{type(self).__name__} implements neither update nor attend")

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory this cache holds right now (allocated storage, including scales/metadata)."""

    def reset(self, rows: list[int] | None = None) -> None:  # noqa: B027 - optional for stateless caches
        """Forget the sequences in `rows` (all rows when None)."""

    def native_kv(self) -> NativeKV | None:
        """The storage the native decode step may read and write in place, or None when the step has no
        layout for this cache."""
        return None

    def keep_prefix(self, row: int, n: int) -> bool:
        """Keep positions 0..n-1 of `row` for a new sequence that shares them; False when unsupported."""
        return False

    def state(self, layer: int) -> dict[str, Any]:
        """Scratch state of a layer that is not attention (e.g. a recurrent state per row), kept here so
        that it lives and dies with the sequences of this cache."""
        states = self.__dict__.setdefault("_layer_states", {})
        return states.setdefault(layer, {})
