"""Quantized linear layers at the Linear-swap seam, and the uniform b-bit format with its CPU kernels.

A `QuantLinear` replaces a model's `Linear` under the same HF name. Its packed tensors are *buffers*, so
`Transformer.weight_bytes()` (and `llamalab info`) count exactly what sits in memory, and `nbytes` /
`bits_per_weight` report the format's real cost including scales, zeros, masks and permutations.

Each format is a subclass registered in `FORMATS` by name. A quantized checkpoint stores, per module, the
format name and its constructor arguments (`spec()`); the loader builds empty modules from those and the
ordinary state-dict assignment fills them (see `llamalab.quant.checkpoint`).

`UniformQuantLinear` is the common b-bit affine format (RTN, GPTQ, AWQ all produce it):
w = scale[g] * (q - zero[g]) per group of `group_size` input columns, codes and zeros packed with
`llamalab.quant.pack`, scales fp16 on disk. At inference (`prepare()` picks, once):

- "native": 8- and 4-bit codes with widths and groups in multiples of 32, where llamalab's native kernels
  are available (`llamalab.kernels`), bf16 or fp32 activations. The kernels read the portable layout as it
  is (no second copy): a few rows (decode) multiply the packed codes directly, dequantizing in registers;
  longer inputs (prefill) dequantize the weight once natively and use a dense matmul. The native decode step
  (`llamalab.generate.native_step`) reads these modules too (`native_tensors`), so a quantized model streams
  2 or 4 times fewer bytes per token than bf16.
- otherwise PyTorch's CPU weight-only kernels when the shape allows, for bf16/fp16 compute:
  8-bit per-channel: `aten._weight_int8pack_mm` (w = s * q8 with q8 = q - 128, plus s * (128 - zero) * sum(x)
  for the zero point, which is exact); 4-bit with groups of 32/64/128/256 dividing the width (per-channel
  4-bit uses the largest of these that divides it, repeating the row's scale):
  `aten._weight_int4pack_mm_for_cpu`, whose weights are (q - 8) * scale + offset with offset = scale * (8 -
  zero). With fp32 activations they are slower than dequantizing (measured, torch 2.13), so fp32 models keep
  the portable layout. Their packed layout depends on the CPU's instruction set, so it is built at load time
  from the portable packing, never written to disk, and replaces it in memory.
- everything else (2, 3, 5-7 bits, other group sizes, non-CPU devices) dequantizes on the fly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llamalab import kernels
from llamalab.errors import LlamalabError
from llamalab.quant.pack import pack, packed_len, unpack

FORMATS: dict[str, type[QuantLinear]] = {}
# format name -> module that defines it (imported by the loader on demand)
FORMAT_MODULES = {
    "uniform": "llamalab.quant.base",
    "nf4": "llamalab.quant.nf4",
    "smoothquant": "llamalab.quant.smoothquant",
    "quip": "llamalab.quant.quip",
    "pbllm": "llamalab.quant.binary",
    "billm": "llamalab.quant.binary",
    "mixed": "llamalab.quant.slimllm",
    "dualbinary": "llamalab.quant.dbllm",
    "gguf": "llamalab.quant.gguf_linear",
}
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
HALF_DTYPES = (torch.bfloat16, torch.float16)
NATIVE_DTYPES = (torch.bfloat16, torch.float32)
NATIVE_BLOCK = 32  # the native kernels decode codes 32 at a time: widths and groups must be multiples
# Up to this many input rows the native kernel multiplies the packed codes directly; longer inputs
# dequantize once and use a dense matmul. Measured on 2 cores (SmolLM2's 1536x576 and 576x1536, int4 g64 and
# int8, bf16): at 1-4 rows the packed product is 2.5-5x faster, the two are even at 8-12 rows, and at 32
# rows dequantizing is 2x faster.
NATIVE_MATMUL_ROWS = 8
NO_PERM = torch.empty(0, dtype=torch.int32)  # the native kernels' "no act-order permutation"
# the native kernels' "every zero is mid-range" (symmetric codes: 8 for 4 bits, 128 for 8)
NO_ZEROS = torch.empty(0, dtype=torch.uint8)


def register_format(cls: type[QuantLinear]) -> type[QuantLinear]:
    FORMATS[cls.format] = cls
    return cls


class QuantLinear(nn.Module):
    """Base class: a linear layer whose weight is stored quantized."""

    format: ClassVar[str] = ""
    fp16_buffers: ClassVar[tuple[str, ...]] = ()  # float buffers stored as fp16 on disk

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    # --- what subclasses implement ------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (besides in/out features and bias)."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) this module computes with, in fp32."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Convert to the in-memory layout of a fast kernel, if there is one (idempotent)."""

    # --- shared ---------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, **spec: Any) -> QuantLinear:
        """A module with correctly shaped (uninitialised) buffers, to be filled from a state dict."""
        return cls(in_features, out_features, bias, **spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def stored_weights(self) -> int:
        """How many weights (and biases) this module stands for: counted by `Transformer.num_parameters`,
        since packed buffers are not parameters."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes this module holds in memory now (all buffers, bias excluded)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    @property
    def storage_bytes(self) -> int:
        """Bytes of the portable format as saved (fp16 for `fp16_buffers`), bias excluded."""
        if getattr(self, "kernel", None) not in (None, "native"):  # "native" keeps the portable layout
            raise LlamalabError("storage size is defined for the portable layout, before prepare()")
        total = 0
        for n, b in self.named_buffers():
            if n != "bias" and n in self._buffers and n not in self._non_persistent_buffers_set:
                total += b.numel() * (2 if n in self.fp16_buffers else b.element_size())
        return total

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes, scales, zeros, masks and permutations, as saved."""
        return 8 * self.storage_bytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.spec()}, {self.bits_per_weight:.3f} bpw"
        )


@register_format
class UniformQuantLinear(QuantLinear):
    """b-bit affine codes with a scale and integer zero per (row, group of input columns).

    Buffers (portable layout, what is saved): `qweight` uint8 (out, packed_len(in, bits)), `scales` (out,
    n_groups) float (fp16 on disk), `qzeros` uint8 (out, packed_len(n_groups, bits)), and with act-order
    without static groups `perm` int32 (in,): codes and groups are in permuted column order and the input
    is permuted the same way (y = x[:, perm] @ W_perm^T), which keeps every group contiguous.
    """

    format = "uniform"
    fp16_buffers = ("scales",)

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int, perm: bool = False
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.bits = bits
        self.group_size = group_size if 0 < group_size < in_features else in_features
        if in_features % self.group_size:
            raise LlamalabError(f"group size {group_size} does not divide the input width {in_features}")
        self.n_groups = in_features // self.group_size
        self.kernel: str | None = None
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.zeros(out_features, self.n_groups))
        self.register_buffer(
            "qzeros", torch.zeros(out_features, packed_len(self.n_groups, bits), dtype=torch.uint8)
        )
        self.register_buffer("perm", torch.zeros(in_features, dtype=torch.int32) if perm else None)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    def spec(self) -> dict[str, Any]:
        g = self.group_size if self.group_size < self.in_features else -1
        return {"bits": self.bits, "group_size": g, "perm": self.perm is not None}

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> UniformQuantLinear:
        """Build from integer codes (out, in) (in permuted column order when `perm` is given), per-group
        scales and integer zeros (out, n_groups)."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bias is not None, bits, group_size, perm is not None)
        m.qweight = pack(codes.to(torch.uint8), bits)
        m.scales = scales.float().reshape(out_f, -1).half().float()
        m.qzeros = pack(zeros.round().to(torch.uint8).reshape(out_f, -1), bits)
        if perm is not None:
            m.perm = perm.to(torch.int32)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    # --- codes ------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        if self.kernel in ("int8", "int4"):
            raise LlamalabError("this module was converted to a kernel layout; its portable codes are gone")
        return unpack(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        return unpack(self.qzeros, self.bits, self.n_groups).float()

    def dequantize(self) -> torch.Tensor:
        w = self._permuted_weight()
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]
        return w

    def _permuted_weight(self) -> torch.Tensor:
        """The fp32 weight in the stored (possibly permuted) column order."""
        if self.kernel in ("int8", "int4"):
            eye = torch.eye(self.in_features, dtype=self._kernel_dtype())
            return self._kernel_forward(eye).float().T.contiguous()
        q = self.codes().float().view(self.out_features, self.n_groups, self.group_size)
        s = self.scales.float().unsqueeze(-1)
        return (s * (q - self.zeros().unsqueeze(-1))).view(self.out_features, self.in_features)

    # --- kernels ----------------------------------------------------------------------------------------
    def int4_kernel_group(self) -> int | None:
        if self.bits != 4 or self.out_features % 16:
            return None
        if self.group_size in INT4_KERNEL_GROUPS:
            return self.group_size
        if self.group_size == self.in_features:  # per channel: repeat the scale over kernel-sized groups
            return next((g for g in INT4_KERNEL_GROUPS if self.in_features % g == 0), None)
        return None

    def native_fits(self) -> bool:
        """Whether llamalab's native int8/int4 kernels take this layer's shape (not whether they are built)."""
        return (
            self.bits in (4, 8)
            and self.in_features % NATIVE_BLOCK == 0
            and self.group_size % NATIVE_BLOCK == 0
        )

    def prepare(self) -> None:
        if self.kernel is not None or self.qweight.device.type != "cpu" or self.qweight.is_meta:
            return
        if self.native_fits() and kernels.quant_matmul() is not None:
            self.kernel = "native"  # the portable buffers are what the native kernels read
            # Symmetric codes (every zero mid-range, 8 or 128) are handed over without zeros: the kernels then
            # take the zero as a constant, and the integer path subtracts it once per chunk for all rows
            # instead of a second dot product per row (qgemm.h, Offset::kSharedZero); the same integers.
            self.shared_zero = bool((self.zeros() == 1 << (self.bits - 1)).all())
            return
        dtype = self.scales.dtype
        if dtype not in HALF_DTYPES:
            # PyTorch's CPU weight-only kernels are slow with fp32 activations (measured with torch 2.13:
            # int4 prefill 1.9 tok/s vs 127 for dense fp32), so an fp32 model keeps the portable layout and
            # dequantizes on the fly; a bf16/fp16 model converts (also lazily, on its first forward).
            return
        if self.bits == 8 and self.n_groups == 1:
            q = self.codes().to(torch.int16) - 128
            z = self.zeros()[:, 0]
            s = self.scales[:, 0].float()
            offset = s * (128 - z)
            self.register_buffer("w_int8", q.to(torch.int8).contiguous(), persistent=False)
            self.register_buffer("w_scale", s.to(dtype), persistent=False)
            self.register_buffer(
                "w_offset", offset.to(dtype) if bool((z != 128).any()) else None, persistent=False
            )
            self.kernel = "int8"
        elif (g := self.int4_kernel_group()) is not None:
            q = self.codes().to(torch.int32)
            rep = self.group_size // g
            s = self.scales.float().repeat_interleave(rep, dim=1)  # (out, in/g)
            z = self.zeros().repeat_interleave(rep, dim=1)
            w_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
            sz = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(dtype)
            self.register_buffer("w_int4", w_int4, persistent=False)
            self.register_buffer("w_sz", sz, persistent=False)
            self.kernel_group = g
            self.kernel = "int4"
        else:
            return
        # The portable buffers are replaced, not duplicated: memory is the kernel layout only.
        del self.qweight, self.scales, self.qzeros

    def _kernel_dtype(self) -> torch.dtype:
        return (self.w_scale if self.kernel == "int8" else self.w_sz).dtype

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.w_int8, self.w_scale)
            if self.w_offset is not None:
                y = y + x2.sum(-1, keepdim=True) * self.w_offset
            return y
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w_int4, self.kernel_group, self.w_sz)

    def native_tensors(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Codes, scales, zeros and permutation as the native decode step reads them (projection.h), or None
        where it cannot (another kernel layout, a bias)."""
        if self.kernel != "native" or self.bias is not None or self.scales.dtype not in NATIVE_DTYPES:
            return None
        return [self.qweight, self.scales, self._native_zeros(), NO_PERM if self.perm is None else self.perm]

    def _native_zeros(self) -> torch.Tensor:
        return NO_ZEROS if getattr(self, "shared_zero", False) else self.qzeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None and x.dtype in HALF_DTYPES and x.dtype == self.scales.dtype:
            self.prepare()  # e.g. a model cast to bf16 after loading
        if self.kernel == "native" and x.dtype in NATIVE_DTYPES and self.scales.dtype in NATIVE_DTYPES:
            y = native_linear(x, self.qweight, self.scales, self._native_zeros(), self.perm, self.in_features)
            if y is not None:
                return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm.long())
        if self.kernel in ("int8", "int4") and x.dtype == self._kernel_dtype():
            y = self._kernel_forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self._permuted_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def native_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor | None:
    """x (..., in) @ W^T for a weight in a native kernel layout (codes, scales, zeros or NF4 values, perm; see
    llamalab/kernels/projection.h), bias excluded; None where the native kernels cannot take it (then the
    module dequantizes in PyTorch, which is always correct)."""
    matmul, dequantize = kernels.quant_matmul(), kernels.quant_dequantize()
    if matmul is None or x.device.type != "cpu":
        return None  # e.g. kernels turned off after prepare()
    x2 = x.reshape(-1, in_features).contiguous()
    if x2.shape[0] <= NATIVE_MATMUL_ROWS and not (x2.requires_grad and torch.is_grad_enabled()):
        y = matmul(x2, codes, scales, zeros, NO_PERM if perm is None else perm, kernels.integer_dot())
    else:
        if perm is not None:
            x2 = x2.index_select(-1, perm.long())
        # Under CPU autocast (QLoRA's bf16 compute) dequantize straight into the compute dtype: F.linear would
        # otherwise cast a full-precision copy of the weight once more on every call.
        dtype = x2.dtype
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in NATIVE_DTYPES:
            dtype = torch.get_autocast_dtype("cpu")
        y = F.linear(x2, dequantize(codes, scales, zeros, in_features, dtype))
    return y.view(*x.shape[:-1], y.shape[-1])
