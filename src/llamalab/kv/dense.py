"""The default KV cache: preallocated dense tensors, one slot per position.

Storage is (max_batch, Hkv, max_len, D) per layer, allocated once (gpt-fast's static cache), so decode does
no allocation and never copies the past. Attention reads the prefix `[:L]` where L is the furthest position
any row of the batch has reached; the mask hides each row's future and the slots it has not written.
"""

from __future__ import annotations

import torch

from llamalab.kv.base import KVCache


class DenseCache(KVCache):
    """Preallocated dense KV cache for `n_layers` layers."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        max_batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_batch, self.max_len = max_batch, max_len
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._mask_key: tuple | None = (
            None  # the mask depends only on (rows, starts, T): build it once a pass
        )
        self._mask: torch.Tensor | None = None

    @classmethod
    def for_model(
        cls, config, max_len: int, max_batch: int = 1, dtype=torch.float32, device="cpu"
    ) -> DenseCache:
        """A cache shaped for `config` (a ModelConfig)."""
        return cls(
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            max_len,
            max_batch,
            dtype,
            device,
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
            from llamalab.errors import ContextLengthError

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
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self, rows=None) -> None:
        # Slots are overwritten before they are read (the mask hides unwritten ones), so nothing to clear.
        self._mask_key = None
