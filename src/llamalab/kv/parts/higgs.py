"""The HIGGS vector quantizer as AQUA-KV uses it on KV vectors (HIGGS: Malinovskii et al., arXiv 2411.17525;
AQUA-KV's `aquakv/quantizers.py::HiggsQuantizer`).

Per token, the flattened vector of all KV heads (width C = heads x head_dim) is cut into groups of g values;
for each group:
  1. scale = ||x||_2 (stored, fp16);
  2. y = H x / scale with H the unnormalised Hadamard matrix of order g (`hadamard.py`): coordinates ~N(0, 1);
  3. y is cut into d-dimensional pieces, each replaced by the index of the nearest of the n points of a
     Gaussian-optimal grid (`grids.py`): argmax 2 y.p - |p|^2, as the reference computes it;
  4. indices are bit-packed (log2(n) bits each, `llamalab.quant.pack`).
Dequantization: x = H^T (grid[idx] * scale) / g. Bits per value: log2(n)/d + 16/g.

The reference pads every token vector to its group size (1024) and quantizes the padding too; here the group
must divide the token width instead (for SmolLM2's 192-wide KV, g = 192 = 12 x 16 by default), which gives the
same per-token scaling with no codes spent on padding.
"""

from __future__ import annotations

import math

import torch

from llamalab.errors import LlamalabError
from llamalab.kv.parts import hadamard
from llamalab.kv.parts.grids import gaussian_grid
from llamalab.quant.pack import pack, packed_len, unpack


def grid_for_bits(bits: float, d: int = 2) -> int:
    """Grid size n giving `bits` per value with d-dimensional points (n = 2^(bits d)), or an error."""
    n = 2 ** (bits * d)
    if abs(n - round(n)) > 1e-9 or not 1 <= round(math.log2(n)) <= 8:
        raise LlamalabError(
            f"{bits:g} bits per value is not a grid of 2^k <= 256 points in dimension {d}; with d={d} use "
            + ", ".join(f"{k / d:g}" for k in range(1, 9))
        )
    return int(round(n))


class Higgs:
    """HIGGS quantizer for (N, width) vectors with groups of `group` values and a (d, n) grid."""

    def __init__(self, width: int, group: int, d: int, n: int) -> None:
        if width % group:
            raise LlamalabError(f"the HIGGS group size {group} must divide the KV width {width}")
        if group % d:
            raise LlamalabError(f"the HIGGS group size {group} must be a multiple of the grid dimension {d}")
        hadamard.factors(group)  # fails with a clear message where no Hadamard matrix is built
        self.width, self.group, self.d, self.n = width, group, d, n
        self.index_bits = int(round(math.log2(n)))
        if 2**self.index_bits != n or self.index_bits > 8:
            raise LlamalabError(f"grid size {n} must be a power of two up to 256")
        self.grid = gaussian_grid(d, n)  # (n, d) fp32
        self.grid_sq = (self.grid**2).sum(1)
        self.n_codes = width // d
        self.code_bytes = packed_len(self.n_codes, self.index_bits)
        self.n_groups = width // group

    @property
    def bits_per_value(self) -> float:
        """Stored bits per value: indices plus the fp16 scale of each group."""
        return 8 * self.code_bytes / self.width + 16 / self.group

    def quantize(self, x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, width) -> packed indices (N, code_bytes) uint8, scales (N, width / group) fp16."""
        N = x.shape[0]
        codes = torch.empty(N, self.code_bytes, dtype=torch.uint8, device=x.device)
        scales = torch.empty(N, self.n_groups, dtype=torch.float16, device=x.device)
        grid, grid_sq = self.grid.to(x.device), self.grid_sq.to(x.device)
        for s in range(0, N, chunk):
            xs = x[s : s + chunk].float().reshape(-1, self.n_groups, self.group)
            scale = xs.norm(dim=-1)  # (n, G)
            scale16 = scale.half()
            safe = torch.where(scale16 > 0, scale16.float(), torch.ones_like(scale))
            y = hadamard.transform(xs) / safe[..., None]  # coordinates ~ N(0, 1)
            pieces = y.reshape(-1, self.d)
            idx = (2 * pieces @ grid.T - grid_sq).argmax(-1)
            codes[s : s + chunk] = pack(idx.reshape(-1, self.n_codes), self.index_bits)
            scales[s : s + chunk] = scale16
        return codes, scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Inverse of `quantize`: (..., code_bytes), (..., groups) -> (..., width) in `dtype`."""
        lead = codes.shape[:-1]
        idx = unpack(codes, self.index_bits, self.n_codes).long()  # (..., width / d)
        y = self.grid.to(codes.device)[idx].reshape(*lead, self.n_groups, self.group)
        y = y * scales.float()[..., None]
        x = hadamard.transform(y, transpose=True) / self.group
        return x.reshape(*lead, self.width).to(dtype)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(*self.quantize(x), dtype=x.dtype)
