"""SmoothQuant: W8A8 (and W6A6, W4A4) by migrating activation outliers into the weights.

Paper: Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", arXiv 2211.10438. Reference code: mit-han-lab/smoothquant
`smoothquant/{calibration,smooth,fake_quant}.py`.

Reproduced: per-channel max |x| of every linear input on the float model (`get_act_scales`); for LLaMA
(`smooth_ln_fcs_llama_like`) input_layernorm -> [q,k,v] and post_attention_layernorm -> [gate,up] with
s_j = max|X_j|^alpha / max_i(max over the fused linears |W_ij|)^(1-alpha), alpha = 0.5, both maxima clamped
>= 1e-5, the norm weight divided by s and the linears' input columns multiplied by s (o_proj and down_proj
are not smoothed, as in the reference); every linear then quantized with `W8A8Linear`'s scheme: weights
per output channel, symmetric absmax, s = max|w| / (2^(b-1) - 1); activations per token, dynamic,
symmetric absmax. The BMM inputs (q/k/v outputs) are not quantized (the reference's `quantize_bmm_input`
option). Symmetric is the reference's choice; the study ran its W/A rows in an OmniQuant-derived framework
whose variant is unstated (research note §2.4).

Real integer arithmetic on the CPU: after `prepare()`, activations are quantized to int8 containers and
multiplied with the int8 weights by `torch._int_mm` (int32 accumulation), then rescaled by the per-token
and per-channel scales; W6A6 and W4A4 use the same path with 6-/4-bit values, which is exact. Where
`torch._int_mm` is not exact (oneDNN without VNNI multiplies u8 x s8 byte pairs with VPMADDUBSW, whose int16
pair sums saturate for large 8-bit values; seen with ONEDNN_MAX_CPU_ISA=AVX2), a one-time probe finds it and
the layers keep the float path (the same integer values multiplied in fp32). Weights are stored packed at
their bit width. The reference calibrates on 512 Pile-val samples of 512 tokens; offline
we use the shipped text (recorded).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.model.modules import set_module
from llamalab.model.norm import RMSNorm
from llamalab.quant.base import QuantLinear, register_format
from llamalab.quant.calib import BlockContext, Stats
from llamalab.quant.methods import Method, register_method
from llamalab.quant.pack import pack, packed_len, unpack


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer values (as float) and per-token scales of x (..., K): symmetric dynamic absmax."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-5) / qmax
    return torch.round(x.float() / s).clamp(-qmax, qmax), s


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether `torch._int_mm` sums int8 products exactly on this CPU: extreme and mixed values against an
    int64 product (a saturating path gets the all-127 rows wrong)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 32), generator=g, dtype=torch.int8)
    a[:8], b[:, :8] = 127, 127  # u8 255 x s8 127 pairs: 64770, beyond int16
    a[8:12], b[:, 8:12] = -127, -127
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


@register_format
class SmoothQuantLinear(QuantLinear):
    """Symmetric per-channel b-bit weights (packed, stored as q + 2^(b-1)) with per-token dynamic
    a-bit activation quantization."""

    format = "smoothquant"
    fp16_buffers = ("scales",)

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int = 8, act_bits: int = 8
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.bits, self.act_bits = bits, act_bits
        self.kernel: str | None = None
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.zeros(out_features))
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "act_bits": self.act_bits}

    @classmethod
    def from_weight(
        cls, w: torch.Tensor, bias: torch.Tensor | None, bits: int, act_bits: int
    ) -> SmoothQuantLinear:
        out_f, in_f = w.shape
        m = cls(in_f, out_f, bias is not None, bits, act_bits)
        qmax = 2 ** (bits - 1) - 1
        s = (w.detach().float().abs().amax(1) / qmax).clamp(min=1e-5).half().float()
        q = torch.round(w.detach().float() / s[:, None]).clamp(-qmax, qmax)
        m.qweight = pack((q + 2 ** (bits - 1)).to(torch.uint8), bits)
        m.scales = s
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def int_weight(self) -> torch.Tensor:
        if self.kernel is not None:
            return self.w_int8_t.T.float()
        return unpack(self.qweight, self.bits, self.in_features).float() - 2 ** (self.bits - 1)

    def dequantize(self) -> torch.Tensor:
        s = self.w_scale if self.kernel is not None else self.scales
        return self.int_weight() * s.float()[:, None]

    def prepare(self) -> None:
        if self.kernel is not None or self.qweight.device.type != "cpu" or self.qweight.is_meta:
            return
        if not int_mm_is_exact():
            return  # the float path: exact integer values, summed in fp32
        self.register_buffer("w_int8_t", self.int_weight().to(torch.int8).T.contiguous(), persistent=False)
        self.register_buffer("w_scale", self.scales.float(), persistent=False)
        del self.qweight, self.scales
        self.kernel = "int_mm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_per_token(x, self.act_bits)
        if self.kernel is not None:
            x2 = xq.reshape(-1, self.in_features).to(torch.int8)
            y = torch._int_mm(x2, self.w_int8_t).float().view(*x.shape[:-1], -1)
            y = y * sx * self.w_scale
        else:
            y = F.linear(xq, self.int_weight()) * sx * self.scales.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


@torch.no_grad()
def smooth_ln_fcs(
    ln: nn.Module, fcs: list[nn.Linear], act_scales: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """The reference `smooth_ln_fcs_llama_like`: fold s into the RMSNorm weight and the linears' columns."""
    weight_scales = torch.cat([fc.weight.abs().amax(0, keepdim=True) for fc in fcs]).amax(0).clamp(min=1e-5)
    scales = (act_scales.float().pow(alpha) / weight_scales.float().pow(1 - alpha)).clamp(min=1e-5)
    ln.weight.div_(scales.to(ln.weight.dtype))
    for fc in fcs:
        fc.weight.mul_(scales.view(1, -1).to(fc.weight.dtype))
    return scales


@register_method
class SmoothQuant(Method):
    name = "smoothquant"
    kinds = {"absmax"}
    propagate = "float"
    bit_range = (4, 8)
    default_bits = 8
    group_sizes_allowed = False
    default_calib = {"nsamples": 64, "seq_len": 512, "seed": 42}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        act_bits = int(options.pop("act_bits", self.bits))
        if not 4 <= act_bits <= 8:
            raise LlamalabError(f"smoothquant: --act-bits {act_bits} is out of range; use 4 to 8")
        out = {"act_bits": act_bits, "alpha": float(options.pop("alpha", 0.5))}
        super().check_options(options)
        return out

    def process_block(
        self,
        i: int,
        block: nn.Module,
        x: torch.Tensor,
        fp_out: torch.Tensor,
        stats: dict[str, Stats],
        ctx: BlockContext,
    ) -> None:
        # The reference smooths the linears that read a norm's output (q/k/v, gate/up) into that norm.
        for group in block.linear_groups():
            norm = block.get_submodule(group.input_op)
            if isinstance(norm, RMSNorm):
                fcs = [block.get_submodule(name) for name in group.linears]
                smooth_ln_fcs(norm, fcs, stats[group.linears[0]].abs_max, self.options["alpha"])
        for name in block.linear_names():
            lin = block.get_submodule(name)
            q = SmoothQuantLinear.from_weight(lin.weight, lin.bias, int(self.bits), self.options["act_bits"])
            set_module(block, name, q)
