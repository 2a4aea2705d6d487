"""DB-LLM's flexible dual binarization (FDB), fitted without training: an explicitly approximate port.

Paper: Chen, Zhang, Li, Xiao, Lin, Ji, Wang, "DB-LLM: Accurate Dual-Binarization for Efficient LLMs",
arXiv 2402.11960. **There is no public code** ("code will be released soon"); the study's DB-LLM row comes
from the authors' own (training-based) runs.

What DB-LLM is: a 2-bit weight w^ = alpha1 b1 + alpha2 b2 with binary b1, b2 in {0, 1} and per-group
*learnable* scales (initialised from the 2-bit uniform step s as alpha1 = 2s, alpha2 = -s), trained with a
straight-through estimator under Deviation-Aware Distillation (a teacher-student loss re-weighting tokens by
the teacher's entropy, on self-generated data).

What is implemented here: the FDB representation and storage (two bit planes + alpha1, alpha2 per (row,
group) in fp16) and a training-free fit of it: per (row, group), initialise alpha1 = 2s, alpha2 = -s from
the 2-bit step s = (max - min) / 3, then alternate
(a) nearest-level assignment and (b) the least-squares alpha1, alpha2 given the planes, weighted by the
column Hessian diagonal diag(H) (an output-error proxy), for `iters` rounds. **Not implemented**: STE
training, Deviation-Aware Distillation, self-generated data. **Added**: a per-group offset beta (fp16), so
the levels are beta + {0, alpha2, alpha1, alpha1 + alpha2}; the paper's FDB has no offset (its levels
include 0 exactly), which without training cannot cover groups whose range is not centred on 0. Storage is
therefore 2 bits + 48 bits per group. Expect results near 2-bit GPTQ, not the paper's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamalab.quant.base import QuantLinear, register_format
from llamalab.quant.calib import Stats
from llamalab.quant.methods import Method, register_method
from llamalab.quant.pack import pack, packed_len, unpack
from llamalab.quant.quantizer import single_thread


@register_format
class DualBinaryLinear(QuantLinear):
    """w = alpha1[g] * b1 + alpha2[g] * b2 + beta[g], two bit planes per weight."""

    format = "dualbinary"
    fp16_buffers = ("alpha1", "alpha2", "beta")

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        ng = in_features // group_size
        self.register_buffer(
            "plane1", torch.zeros(out_features, packed_len(in_features, 1), dtype=torch.uint8)
        )
        self.register_buffer(
            "plane2", torch.zeros(out_features, packed_len(in_features, 1), dtype=torch.uint8)
        )
        for n in ("alpha1", "alpha2", "beta"):
            self.register_buffer(n, torch.zeros(out_features, ng))

    def spec(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def dequantize(self) -> torch.Tensor:
        G = self.group_size
        b1 = unpack(self.plane1, 1, self.in_features).float()
        b2 = unpack(self.plane2, 1, self.in_features).float()
        r = lambda t: t.float().repeat_interleave(G, 1)  # noqa: E731
        return r(self.alpha1) * b1 + r(self.alpha2) * b2 + r(self.beta)


def fdb_fit(W: torch.Tensor, hdiag: torch.Tensor, G: int, iters: int = 10) -> dict[str, torch.Tensor]:
    """Fit b1, b2, alpha1, alpha2 (and a per-group offset beta, see the module docstring) per (row, group)."""
    rows, cols = W.shape
    Wg = W.float().reshape(rows, cols // G, G)
    h = hdiag.float().reshape(1, cols // G, G).expand_as(Wg)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    s = ((hi - lo) / 3).clamp(min=1e-8)
    a1, a2 = 2 * s, -s
    beta = lo + s  # levels beta + {a2, 0, a1 + a2, a1} = lo + {0, s, 2s, 3s}
    for _ in range(iters):
        levels = torch.stack([beta, beta + a2, beta + a1, beta + a1 + a2], -1)  # (rows, ng, 1, 4)
        idx = (Wg.unsqueeze(-1) - levels).abs().argmin(-1)  # 0:(0,0) 1:(0,1) 2:(1,0) 3:(1,1)
        b1, b2 = (idx >= 2).float(), (idx % 2).float()
        # weighted least squares for (a1, a2, beta): minimise sum h (w - a1 b1 - a2 b2 - beta)^2
        X = torch.stack([b1, b2, torch.ones_like(b1)], -1)  # (rows, ng, G, 3)
        A = (X * h.unsqueeze(-1)).transpose(-1, -2) @ X + 1e-8 * torch.eye(3)
        y = (X * (h * Wg).unsqueeze(-1)).sum(-2)
        sol = torch.linalg.lstsq(A, y.unsqueeze(-1)).solution[..., 0]
        a1, a2, beta = (sol[..., k : k + 1].half().float() for k in range(3))
    levels = torch.stack([beta, beta + a2, beta + a1, beta + a1 + a2], -1)
    idx = (Wg.unsqueeze(-1) - levels).abs().argmin(-1)
    return {"b1": (idx >= 2).reshape(rows, cols), "b2": (idx % 2 == 1).reshape(rows, cols),
            "alpha1": a1[..., 0], "alpha2": a2[..., 0], "beta": beta[..., 0]}  # fmt: skip


@register_method
class DBLLM(Method):
    name = "dbllm"
    kinds = {"hessian"}
    bit_range = (2, 2)
    default_bits = 2
    default_group_size = 64

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"iters": int(options.pop("iters", 10))}
        if self.group_size <= 0:
            self.group_size = 64
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> DualBinaryLinear:
        with single_thread():
            r = fdb_fit(
                linear.weight.detach(), torch.diag(stats.hessian()), self.group_size, self.options["iters"]
            )
        out_f, in_f = linear.weight.shape
        m = DualBinaryLinear(in_f, out_f, linear.bias is not None, self.group_size)
        m.plane1 = pack(r["b1"].to(torch.uint8), 1)
        m.plane2 = pack(r["b2"].to(torch.uint8), 1)
        m.alpha1, m.alpha2, m.beta = r["alpha1"], r["alpha2"], r["beta"]
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m
