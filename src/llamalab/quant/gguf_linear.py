"""GGUF's Q4_0, Q4_1, Q8_0, Q4_K and Q6_K weights as a quantized Linear, run as they are stored.

llama.cpp's block formats (ggml-common.h; `gguf.quants` dequantizes them the same way): each 32 consecutive
weights of a row are one block with an fp16 scale d,
  Q4_0: 16 bytes of 4-bit codes q,              w = d * (q - 8)       (4.5 bits per weight)
  Q4_1: an fp16 min m and 16 bytes of codes q,  w = d * q + m         (5.0 bits per weight)
  Q8_0: 32 int8 codes q,                         w = d * q             (8.5 bits per weight)
with element j of a 4-bit block in the low nibble of byte j and element j + 16 in its high nibble; and two
K-quants,
  Q4_K: super-blocks of 256 weights, 8 groups of 32, each group with a 6-bit scale sc and 6-bit min mn under
        the super-block's fp16 d and dmin: w = (d * sc) * q - (dmin * mn)                (4.5 bits per weight)
        (the scales packed 12 bytes a super-block, `get_scale_min_k4`; the codes in 64-weight chunks, the
        first 32 in the low nibbles of 32 bytes and the next 32 in their high nibbles);
  Q6_K: super-blocks of 256 weights, 16 groups of 16, each group with an int8 scale sc under the super-block's
        fp16 d, 6-bit codes q (4 low bits in `ql`, 2 high bits in `qh`): w = (d * sc) * (q - 32)
        (6.5625 bits per weight).

`GGUFLinear` keeps exactly these values: the blocks are split into a codes matrix and the fp16 scales (and
mins), no value is converted. The scales are held as their raw 16 bits (int16 buffers), so casting a model to
bf16 or fp32 cannot round them. The native kernels (llamalab/kernels/qgemm.h) read the codes directly: the
GGUF nibble order is the portable layout's under a fixed column permutation within each block (`perm`), Q4_0
has no zeros (its zero is the kernels' default 8), Q8_0's codes are signed. Q4_K is held as its 4-bit codes in
the portable pairs order (a 32-code group of Q4_K spans the low nibbles of 32 bytes, so no column permutation
within 32 columns maps it), with the 6-bit scales and mins widened to bytes beside the fp16 super-scales, as
the kernels' two-level scales read them (`d`, `m`: uint8 rows of the G group values, then the G / 8 fp16
super-scales' bytes; dmin is stored negated, so that w = scale * q + min as for Q4_1). Q6_K is held as its
codes widened to signed bytes (q - 32, element order) with `d` an int8 row of its 16-weight groups' scales
followed by the fp16 super-scales' bytes: the kernels have no 6-bit unpacking, so it runs on the 8-bit tiles
(groups of 16) at 8.56 bits per weight instead of the file's 6.56. No value changes: every weight is exactly
`gguf.quants.dequantize`'s; Q4_K costs 4.625 bits per weight instead of the file's 4.5 (the widened
scales). Decode products take the integer path (8-bit activations, as llama.cpp) or the exact one (see
`llamalab.kernels.integer_dot`); longer inputs dequantize once into a dense matmul. Without the kernels the
module dequantizes on every call (correct, slow): the GGUF loader only keeps weights quantized where the
kernels run (`llamalab.io.load`). The other K-quants (and Q5_0, Q5_1) stay dense (dequantized to fp32 on
load).
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
SUPER_BLOCK = 256  # a K-quant super-block: one fp16 super-scale over its groups
K_QUANTS = ("Q4_K", "Q6_K")  # held with two-level scales (the kernels' kSuperU8 / kSuperI8)
Q6_K_GROUP = 16  # Q6_K's scales cover 16 weights each
# type -> (bytes per block, weights per block, whether it has a min, bits per code)
LAYOUTS = {
    "Q4_0": (18, 32, False, 4),
    "Q4_1": (20, 32, True, 4),
    "Q8_0": (34, 32, False, 8),
    "Q4_K": (144, 256, True, 4),
    "Q6_K": (210, 256, False, 8),  # the codes widened to bytes
}
EMPTY = torch.empty(0)


def nibble_permutation(in_features: int) -> torch.Tensor:
    """Input column of each 4-bit code in the portable pairs order (code 2j in the low nibble of byte j, 2j + 1
    in its high nibble), for GGUF's order: per block, byte j holds element j (low) and j + 16 (high)."""
    j = torch.arange(in_features)
    block, within = j // BLOCK, j % BLOCK
    return (block * BLOCK + torch.where(within % 2 == 0, within // 2, 16 + within // 2)).to(torch.int32)


@register_format
class GGUFLinear(QuantLinear):
    """A linear layer holding GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K blocks (see the module docstring)."""

    format = "gguf"

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: str) -> None:
        super().__init__(in_features, out_features, bias)
        if qtype not in LAYOUTS:
            raise LlamalabError(f"GGUF type {qtype} has no native layout (have {', '.join(LAYOUTS)})")
        _, block, has_min, bits = LAYOUTS[qtype]
        if in_features % block:
            raise LlamalabError(f"GGUF {qtype}: the input width {in_features} is not a multiple of {block}")
        self.qtype = qtype
        self.group = Q6_K_GROUP if qtype == "Q6_K" else BLOCK
        groups = in_features // self.group
        codes_dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("codes", torch.zeros(out_features, in_features * bits // 8, dtype=codes_dtype))
        if qtype in K_QUANTS:  # group values as bytes, then the fp16 super-scales' bytes
            dtype = torch.int8 if qtype == "Q6_K" else torch.uint8
            scales = torch.zeros(out_features, groups + 2 * (in_features // SUPER_BLOCK), dtype=dtype)
        else:
            scales = torch.zeros(out_features, groups, dtype=torch.int16)  # fp16 bits
        self.register_buffer("d", scales)
        self.register_buffer("m", scales.clone() if has_min else None)
        perm = nibble_permutation(in_features) if bits == 4 and qtype != "Q4_K" else None
        self.register_buffer("perm", perm, persistent=False)

    def spec(self) -> dict[str, Any]:
        return {"qtype": self.qtype}

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, qtype: str, out_features: int, in_features: int) -> GGUFLinear:
        """From a GGUF tensor's raw bytes (`GGUFReader` tensor data: rows of blocks)."""
        size, block, has_min, bits = LAYOUTS[qtype]
        m = cls(in_features, out_features, False, qtype)
        raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(out_features, in_features // block, size)
        if qtype == "Q4_K":
            m.codes, m.d, m.m = (torch.from_numpy(a) for a in q4_k_parts(raw))
            return m
        if qtype == "Q6_K":
            m.codes, m.d = (torch.from_numpy(a) for a in q6_k_parts(raw))
            return m
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

    def _group_values(self, held: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The (rows, groups) fp32 scales or mins held in `held` (`d` or `m`), all rows or only `rows`."""
        if rows is not None:
            held = held[rows]
        if self.qtype not in K_QUANTS:
            return held.view(torch.float16).float()
        groups = self.in_features // self.group
        sub, sup = held[:, :groups].float(), held[:, groups:].contiguous().view(torch.float16).float()
        # exact: an fp16 times an 8-bit integer
        return sup.repeat_interleave(SUPER_BLOCK // self.group, 1) * sub

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (out, in) in fp32, or only its `rows` (an index tensor; an embedding's lookup)."""
        codes = self.codes if rows is None else self.codes[rows]
        n = codes.shape[0]
        d = self._group_values(self.d, rows).repeat_interleave(self.group, 1)
        if self.qtype in ("Q8_0", "Q6_K"):
            return d * codes.float()
        if self.qtype == "Q4_K":  # the pairs order: code 2j in the low nibble of byte j, 2j + 1 in the high
            q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(n, -1).float()
        else:
            blocks = codes.view(n, -1, BLOCK // 2)
            q = torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(n, -1).float()
        if self.m is None:
            return d * (q - 8)
        return d * q + self._group_values(self.m, rows).repeat_interleave(self.group, 1)

    def native_tensors(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Codes, scales, mins (Q4_1, Q4_K) or nothing, and the nibble permutation, as the native kernels read
        them (projection.h): fp16 scales and mins, or the K-quants' two-level bytes."""
        if self.bias is not None or dtype not in NATIVE_DTYPES or self.codes.device.type != "cpu":
            return None
        d, m = self.d, self.m
        if self.qtype not in K_QUANTS:  # fp16 bits held as int16
            d, m = d.view(torch.float16), None if m is None else m.view(torch.float16)
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


def q4_k_parts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks (rows, super-blocks, 144 bytes) as GGUFLinear holds them: the codes in the pairs order, and
    the scales and mins as rows of group bytes followed by the fp16 super-scales' bytes (dmin negated)."""
    rows, n_super, _ = raw.shape
    d, dmin, packed, qs = raw[..., 0:2], raw[..., 2:4], raw[..., 4:16], raw[..., 16:]
    # ggml's get_scale_min_k4: groups 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7
    # from the nibbles of bytes 8-11 with their top 2 bits in the top bits of bytes 0-3 / 4-7
    lo, hi, both = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo & 63, (both & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (both >> 4) | ((hi >> 6) << 4)], axis=-1)
    # 4 chunks of 64 weights a super-block: the first 32 in the low nibbles of 32 bytes, the next 32 in the
    # high ones
    chunks = qs.reshape(rows, n_super, 4, 1, 32)
    q = np.concatenate([chunks & 15, chunks >> 4], axis=3).reshape(rows, -1)  # element order
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    neg_dmin = (dmin.copy().view(np.uint16) ^ np.uint16(0x8000)).view(np.uint8)  # the sign bit: exact
    scales = np.concatenate([sc.reshape(rows, -1), d.reshape(rows, -1)], axis=1)
    mins = np.concatenate([mn.reshape(rows, -1), neg_dmin.reshape(rows, -1)], axis=1)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales), np.ascontiguousarray(mins)


def q6_k_parts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks (rows, super-blocks, 210 bytes) as GGUFLinear holds them: the codes q - 32 as int8 in
    element order, and the scales as rows of the 16-weight groups' int8 values and the fp16 super-scales."""
    rows, n_super, _ = raw.shape
    ql, qh, sc, d = raw[..., 0:128], raw[..., 128:192], raw[..., 192:208], raw[..., 208:210]
    halves = []
    for h in range(2):  # ggml's dequantize_row_q6_K: per 128 weights, 64 bytes of ql and 32 of qh
        low, high = ql[..., 64 * h : 64 * h + 64], qh[..., 32 * h : 32 * h + 32]
        for quarter in range(4):  # weights 32 * quarter .. + 32 of this half
            nibble = low[..., 32 * (quarter % 2) : 32 * (quarter % 2) + 32]
            nibble = nibble & 15 if quarter < 2 else nibble >> 4
            halves.append(nibble | (((high >> (2 * quarter)) & 3) << 4))
    q = np.stack(halves, axis=2).reshape(rows, -1).astype(np.int16) - 32
    scales = np.concatenate([sc.reshape(rows, -1), d.reshape(rows, -1)], axis=1).view(np.int8)
    return np.ascontiguousarray(q.astype(np.int8)), np.ascontiguousarray(scales)
