"""RTN: round-to-nearest weight quantization, the no-calibration baseline of every table.

Paper context: the baseline rows of "How Good Are Low-bit Quantized LLaMA3 Models? An Empirical Study"
(Huang et al., arXiv 2404.14047). The study's RTN rows come from OmniQuant's `UniformAffineQuantizer`
with training switched off: asymmetric min-max per output channel or per group of 128 input columns. That is
our default (`convention="minmax"`, the raw min/max of each group), and it stays the default because it is
what the study table measures; `--convention gptq` (`convention="gptq"` from Python or a lab grid) gives GPTQ's
quantizer instead (range min(w, 0)..max(w, 0), forced to contain 0), for comparisons; `--sym` gives
symmetric absmax. 1 to 8 bits.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llamalab.errors import LlamalabError
from llamalab.quant.base import UniformQuantLinear
from llamalab.quant.methods import Method, register_method
from llamalab.quant.quantizer import group_affine


@register_method
class RTN(Method):
    name = "rtn"
    calibrated = False
    kinds: set[str] = set()
    bit_range = (1, 8)
    default_bits = 4
    default_group_size = -1

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        sym = bool(options.pop("sym", False))
        convention = options.pop("convention", "minmax")
        if convention not in ("minmax", "gptq"):
            raise LlamalabError(f"rtn: convention must be 'minmax' or 'gptq', got {convention!r}")
        if sym and self.bits == 1:
            raise LlamalabError("rtn: symmetric 1-bit has no levels; use asymmetric (the default)")
        super().check_options(options)
        return {"sym": sym, "convention": convention}

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> UniformQuantLinear:
        q, s, z = group_affine(
            linear.weight.detach(),
            int(self.bits),
            self.group_size,
            self.options["sym"],
            self.options["convention"],
        )
        return UniformQuantLinear.from_codes(q, s, z, int(self.bits), self.group_size, linear.bias)
