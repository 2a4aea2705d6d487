"""GGUF's Q4_0, Q4_1 and Q8_0 weights as a quantized Linear, run as they are stored.

llama.cpp's block formats (ggml-common.h; `gguf.quants` dequantizes them the same way): each 32 consecutive
weights of a row are one block with an fp16 scale d,
  Q4_0: 16 bytes of 4-bit codes q,              w = d * (q - 8)       (4.5 bits per weight)
  Q4_1: an fp16 min m and 16 bytes of codes q,  w = d * q + m         (5.0 bits per weight)
  Q8_0: 32 int8 codes q,                         w = d * q             (8.5 bits per weight)
with element j of a 4-bit block in the low nibble of byte j and element j + 16 in its high nibble.

`GGUFLinear` keeps exactly these values: the blocks are split into a codes matrix and the fp16 scales (and
mins), no value is converted. The scales are held as their raw 16 bits (int16 buffers), so casting a model to
bf16 or fp32 cannot round them. The native kernels (llamalab/kernels/qgemm.h) read the codes directly: the
GGUF nibble order is the portable layout's under a fixed column permutation within each block (`perm`), Q4_0
has no zeros (its zero is the kernels' default 8), Q8_0's codes are signed. Decode products take the integer
path (8-bit activations, as llama.cpp) or the exact one (see `llamalab.kernels.integer_dot`); longer inputs
dequantize once into a dense matmul. Without the kernels the module dequantizes on every call (correct, slow):
the GGUF loader only keeps weights quantized where the kernels run (`llamalab.io.load`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llamalab import kernels
from llamalab.errors import LlamalabError
from llamalab.quant.base import NATIVE_DTYPES, NO_PERM, QuantLinear, native_linear, register_format

BLOCK = 32
# type -> (bytes per block, whether it has a min, bits per code)
LAYOUTS = {"Q4_0": (18, False, 4), "Q4_1": (20, True, 4), "Q8_0": (34, False, 8)}
EMPTY = torch.empty(0)


def nibble_permutation(in_features: int) -> torch.Tensor:
    """Input column of each 4-bit code in the portable pairs order (code 2j in the low nibble of byte j, 2j + 1
    in its high nibble), for GGUF's order: per block, byte j holds element j (low) and j + 16 (high)."""
    j = torch.arange(in_features)
    block, within = j // BLOCK, j % BLOCK
    return (block * BLOCK + torch.where(within % 2 == 0, within // 2, 16 + within // 2)).to(torch.int32)


@register_format
class GGUFLinear(QuantLinear):
    """A linear layer holding GGUF Q4_0 / Q4_1 / Q8_0 blocks (see the module docstring)."""

    format = "gguf"

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: str) -> None:
        super().__init__(in_features, out_features, bias)
        if qtype not in LAYOUTS:
            raise LlamalabError(f"GGUF type {qtype} has no native layout (have {', '.join(LAYOUTS)})")
        if in_features % BLOCK:
            raise LlamalabError(f"GGUF {qtype}: the input width {in_features} is not a multiple of {BLOCK}")
        self.qtype = qtype
        _, has_min, bits = LAYOUTS[qtype]
        groups = in_features // BLOCK
        codes_dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("codes", torch.zeros(out_features, in_features * bits // 8, dtype=codes_dtype))
        self.register_buffer("d", torch.zeros(out_features, groups, dtype=torch.int16))  # fp16 bits
        self.register_buffer("m", torch.zeros(out_features, groups, dtype=torch.int16) if has_min else None)
        perm = nibble_permutation(in_features) if bits == 4 else None
        self.register_buffer("perm", perm, persistent=False)

    def spec(self) -> dict[str, Any]:
        return {"qtype": self.qtype}

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, qtype: str, out_features: int, in_features: int) -> GGUFLinear:
        """From a GGUF tensor's raw bytes (`GGUFReader` tensor data: rows of blocks)."""
        size, has_min, bits = LAYOUTS[qtype]
        m = cls(in_features, out_features, False, qtype)
        raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(out_features, in_features // BLOCK, size)
        m.d = torch.from_numpy(raw[:, :, :2].copy().view(np.int16).reshape(out_features, -1))
        start = 2
        if has_min:
            m.m = torch.from_numpy(raw[:, :, 2:4].copy().view(np.int16).reshape(out_features, -1))
            start = 4
        codes = raw[:, :, start:].reshape(out_features, -1).copy()
        m.codes = torch.from_numpy(codes.view(np.int8) if bits == 8 else codes)
        return m

    @classmethod
    def from_weight(cls, weight: torch.Tensor, qtype: str) -> GGUFLinear:
        """Quantize a float weight (out, in) with the `gguf` package's reference quantizer (llama.cpp's)."""
        import gguf

        gtype = gguf.GGMLQuantizationType[qtype]
        blocks = gguf.quants.quantize(weight.detach().float().contiguous().numpy(), gtype)
        return cls.from_blocks(blocks, qtype, *weight.shape)

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.d.view(torch.float16), None if self.m is None else self.m.view(torch.float16)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (out, in) in fp32, or only its `rows` (an index tensor; an embedding's lookup)."""
        codes, d, m = self.codes, *self._scales()
        if rows is not None:
            codes, d, m = codes[rows], d[rows], None if m is None else m[rows]
        n = codes.shape[0]
        d = d.float().repeat_interleave(BLOCK, 1)
        if self.qtype == "Q8_0":
            return d * codes.float()
        blocks = codes.view(n, -1, BLOCK // 2)
        q = torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(n, -1).float()
        if m is None:
            return d * (q - 8)
        return d * q + m.float().repeat_interleave(BLOCK, 1)

    def native_tensors(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Codes, fp16 scales, fp16 mins (Q4_1) or nothing, and the nibble permutation, as the native kernels
        read them (projection.h)."""
        if self.bias is not None or dtype not in NATIVE_DTYPES or self.codes.device.type != "cpu":
            return None
        d, m = self._scales()
        return [self.codes, d, EMPTY if m is None else m, NO_PERM if self.perm is None else self.perm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.native_tensors(x.dtype)
        if tensors is not None and kernels.quant_matmul() is not None:
            codes, d, m, _ = tensors
            y = native_linear(x, codes, d, m, self.perm, self.in_features)
            if y is not None:
                return y
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
