"""The KV-cache seam.

Every KV-cache method (dense, KIVI, AQUA-KV, MiniCache, DMC, ...) implements `KVCache`: it is handed each
layer's new keys and values, and returns what attention must read for that layer together with the mask
saying which of those entries each query may see. It also reports the bytes it really holds, so that a
compressed cache's saving is measured, not assumed.

Rows: a cache holds up to `max_batch` independent sequences. A forward pass names the cache rows its batch
rows map to (`rows`), and where each row's new tokens start (`starts`), so that sequences of different
lengths can decode together and join or leave between steps (continuous batching).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class KVCache(ABC):
    """Storage of past keys/values for every layer of one model, for `max_batch` sequences."""

    max_batch: int
    max_len: int

    @abstractmethod
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: list[int], starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store `k`, `v` (B, Hkv, T, D) of `layer` for batch rows mapped to cache `rows`, at positions
        `starts[b] .. starts[b]+T-1`, and return (keys, values, mask) for attention: keys/values
        (B, Hkv, L, D) and a boolean mask (B, 1, T, L) (True = may attend), or None for a plain causal
        mask over exactly the T new tokens."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory this cache holds right now (allocated storage, including scales/metadata)."""

    def reset(self, rows: list[int] | None = None) -> None:  # noqa: B027 - optional for stateless caches
        """Forget the sequences in `rows` (all rows when None)."""
