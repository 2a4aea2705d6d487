"""Full-precision per-layer storage with the interface of `kivi.KiviStore` (read / write / reset / nbytes),
so a method that stores states (MiniCache's unmerged layers and merged directions) can keep them dense or
KIVI-quantized with the same code."""

from __future__ import annotations

import torch

from llamalab.errors import ContextLengthError


class DenseStore:
    """Keys and values of one layer for `max_batch` rows, one slot per position, allocated once."""

    def __init__(self, n_heads, head_dim, max_len, max_batch, dtype, device) -> None:
        self.k = torch.zeros(max_batch, n_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = [0] * max_batch

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self, rows: list[int]) -> None:
        for r in rows:
            self.length[r] = 0

    def read(self, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        P = max(self.length[r] for r in rows)
        if P == 0:
            return None, None
        return self.k[rows, :, :P], self.v[rows, :, :P]

    def write(self, rows: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[2]
        for b, r in enumerate(rows):
            s = self.length[r]
            if s + T > self.k.shape[2]:
                raise ContextLengthError(f"KV cache row {r} is full ({self.k.shape[2]} positions)")
            self.k[r, :, s : s + T] = k[b]
            self.v[r, :, s : s + T] = v[b]
            self.length[r] = s + T
