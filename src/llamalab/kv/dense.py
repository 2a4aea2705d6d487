"""The default KV cache: preallocated dense tensors, one slot per position.

Storage is (max_batch, Hkv, max_len, D) per attention layer, allocated once (gpt-fast's static cache), so
decode does no allocation and never copies the past. Attention reads the prefix `[:L]` where L is the
furthest position any row of the batch has reached; the mask hides each row's future and the slots it has
not written. It is also the layout the native decode step reads and writes (`native_kv`).
"""

from __future__ import annotations

import torch

from llamalab.errors import ContextLengthError
from llamalab.kv.base import KVCache, NativeKV
from llamalab.kv.registry import CacheSpec, register_kv_cache


class DenseCache(KVCache):
    """Preallocated dense KV cache for the attention layers `layers` (all of `n_layers` by default)."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        max_batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layers: list[int] | None = None,
    ) -> None:
        self.max_batch, self.max_len = max_batch, max_len
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        attention = set(range(n_layers) if layers is None else layers)
        self.all_attention = len(attention) == n_layers
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) if i in attention else None
            for i in range(n_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=dtype, device=device) if i in attention else None
            for i in range(n_layers)
        ]
        self._mask_key: tuple | None = (
            None  # the mask depends only on (rows, starts, T): build it once a pass
        )
        self._mask: torch.Tensor | None = None

    @classmethod
    def for_model(
        cls, config, max_len: int, max_batch: int = 1, dtype=torch.float32, device="cpu"
    ) -> DenseCache:
        """A cache shaped for `config` (a ModelConfig): slots for its attention layers only."""
        types = config.layer_types
        return cls(
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            max_len,
            max_batch,
            dtype,
            device,
            layers=[i for i, t in enumerate(types) if t == "attention"],
        )

    def _rows(self, rows: list[int]) -> slice | list[int]:
        # A contiguous run of rows is a view (no copy); anything else is gathered.
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return rows

    def update(self, layer, k, v, rows, starts):
        T = k.shape[2]
        end = max(starts) + T
        if end > self.max_len:
            raise ContextLengthError(
                f"sequence reaches position {end}, beyond the cache's {self.max_len} slots"
            )
        sel = self._rows(rows)
        kc, vc = self.k[layer], self.v[layer]
        if len(set(starts)) == 1:
            s = starts[0]
            kc[sel, :, s : s + T] = k
            vc[sel, :, s : s + T] = v
        else:
            for b, (row, s) in enumerate(zip(rows, starts)):
                kc[row, :, s : s + T] = k[b]
                vc[row, :, s : s + T] = v[b]
        keys, values = kc[sel, :, :end], vc[sel, :, :end]  # (B, Hkv, L, D)
        if T == end:  # every row starts at 0: a fresh prefill, plain causal attention
            return keys, values, None
        if T == 1 and len(set(starts)) == 1:  # one new token per row, all rows as long: it sees every key
            return keys, values, None
        return keys, values, self._causal_mask(rows, starts, T, end, k.device)

    def _causal_mask(self, rows, starts, T, end, device) -> torch.Tensor:
        key = (tuple(rows), tuple(starts), T)
        if key != self._mask_key:
            q_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
            k_pos = torch.arange(end, device=device)  # (L,)
            self._mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # (B, 1, T, L)
            self._mask_key = key
        return self._mask

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def reset(self, rows=None) -> None:
        # Slots are overwritten before they are read (the mask hides unwritten ones), so nothing to clear.
        self._mask_key = None

    def native_kv(self):
        # Only this class's own storage semantics: a subclass that stores or reads differently opts in itself.
        ours = type(self).update is DenseCache.update and type(self).attend is KVCache.attend
        if not (ours and self.all_attention):
            return None
        return NativeKV("dense", [t for kv in zip(self.k, self.v) for t in kv], self.k[0].dtype)

    def keep_prefix(self, row: int, n: int) -> bool:
        # Positions past n are overwritten before they are read; other layers' state cannot be truncated.
        return self.all_attention


@register_kv_cache("dense")
def dense_cache(spec: CacheSpec, config, max_len: int, max_batch: int, dtype, device) -> DenseCache:
    """One slot per position, full precision (the default)."""
    spec.refuse_settings()
    return DenseCache.for_model(config, max_len, max_batch, dtype=dtype, device=device)
