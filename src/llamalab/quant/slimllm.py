"""SliM-LLM: salience-driven mixed-precision groups (SBA) with a salience-weighted scale search (SQC) and
GPTQ compensation.

Paper: Huang, Liu, Qin, Li, Zhang, Magno, Qi, "SliM-LLM: Salience-Driven Mixed-Precision Quantization for
Large Language Models", arXiv 2405.14917. Reference code: Aaronhuang-778/SliM-LLM
`slim-llm/{slim_gptq.py, utils/bitsearch.py, utils/mixed_quantizer.py}`; the LLaMA-3 script quantizes to
2 bits with groups of 128.

Reproduced: group salience s_g = sum over the group's columns of W^2 / diag(H_c)^2 (H_c the upper Cholesky
factor of the damped H^-1); the k most salient groups get bits+1 and the k least salient bits-1 (the mean
stays at `bits`), k in 0..n_groups/2 chosen by the KL divergence between softmax(x W^T) and
softmax(x W_q^T) on 256 calibration tokens (`activation_aware_search`; W_q is the round-to-nearest of the
candidate allocation); then GPTQ's column loop (block 128, damp 0.01) with each group's parameters found when
the group starts, at that group's bit width, 1-bit groups binarized as sign(w - mu) alpha + mu.

Approximated (stated, not hidden): SQC's per-group scale multiplier search over {1} U linspace(1, 1.1, 50)
U linspace(1, 0.9, 50) uses the column-Hessian-weighted squared error sum_j H_jj (w_ij - q_ij)^2 as its
salience-weighted error; the reference weights the error by a salience mask whose exact form we did not
verify. Storage ("mixed" format): codes of each bit width packed separately, a float scale and offset per
(row, group) in fp16 (w = scale * q + offset, which also holds the 1-bit groups), the group bit widths in
the checkpoint's module spec.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamalab.quant.base import QuantLinear, register_format
from llamalab.quant.calib import Stats
from llamalab.quant.gptq import gptq_sweep, prepare_hessian
from llamalab.quant.methods import Method, register_method
from llamalab.quant.pack import pack, packed_len, unpack
from llamalab.quant.quantizer import affine_params, single_thread

SQC_GRID = torch.cat([torch.ones(1), torch.linspace(1, 1.1, 50), torch.linspace(1, 0.9, 50)])


@register_format
class MixedLinear(QuantLinear):
    """Per-group bit widths; w = scale[g] * q + offset[g]."""

    format = "mixed"
    fp16_buffers = ("scales", "offsets")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        group_bits: list[int] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.group_bits = list(group_bits or [2] * (in_features // group_size))
        for b in sorted(set(self.group_bits)):
            n = self.group_bits.count(b) * group_size
            self.register_buffer(f"codes{b}", torch.zeros(out_features, packed_len(n, b), dtype=torch.uint8))
        ng = len(self.group_bits)
        self.register_buffer("scales", torch.zeros(out_features, ng))
        self.register_buffer("offsets", torch.zeros(out_features, ng))

    def spec(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "group_bits": self.group_bits}

    @classmethod
    def from_codes(cls, codes, scales, offsets, group_bits, group_size, bias) -> MixedLinear:
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bias is not None, group_size, group_bits)
        G = group_size
        for b in sorted(set(group_bits)):
            cols = torch.cat([torch.arange(g * G, (g + 1) * G) for g, gb in enumerate(group_bits) if gb == b])
            setattr(m, f"codes{b}", pack(codes[:, cols].to(torch.uint8), b))
        m.scales, m.offsets = scales.float(), offsets.float()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        G = self.group_size
        q = torch.empty(self.out_features, self.in_features)
        for b in sorted(set(self.group_bits)):
            groups = [g for g, gb in enumerate(self.group_bits) if gb == b]
            vals = unpack(getattr(self, f"codes{b}"), b, len(groups) * G).float()
            for j, g in enumerate(groups):
                q[:, g * G : (g + 1) * G] = vals[:, j * G : (j + 1) * G]
        s = self.scales.float().repeat_interleave(G, 1)
        o = self.offsets.float().repeat_interleave(G, 1)
        return s * q + o


def _group_params(w: torch.Tensor, bits: int, mult: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per row for a group at `bits`; 1 bit is the mean-centred sign binarizer."""
    if bits == 1:
        mu = w.mean(1, keepdim=True)
        alpha = (w - mu).abs().mean(1, keepdim=True) * mult
        return (2 * alpha).half().float(), (mu - alpha).half().float()
    p = affine_params(w, bits, False, "gptq")
    scale = (p.scale * mult).half().float()
    return scale, (-scale * p.zero).half().float()


def _codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round((w - offset) / scale.clamp(min=1e-12)), 0, 2**bits - 1)


def allocate_bits(W: torch.Tensor, Hinv: torch.Tensor, X: torch.Tensor, bits: int, G: int) -> list[int]:
    """SBA: choose k by the KL of the output distributions (RTN of each candidate allocation)."""
    cols = W.shape[1]
    ng = cols // G
    S = W**2 / torch.diag(Hinv).reshape(1, -1) ** 2
    sal = S.view(W.shape[0], ng, G).sum((0, 2))
    order = torch.argsort(sal, descending=True)
    ref = torch.log_softmax(X @ W.T, -1)
    best = (float("inf"), [bits] * ng)
    lo = max(bits - 1, 1)
    for k in range(0, ng // 2 + 1):
        alloc = [bits] * ng
        for g in order[:k].tolist():
            alloc[g] = min(bits + 1, 8)
        for g in order[ng - k :].tolist() if k else []:
            alloc[g] = lo
        Wq = torch.empty_like(W)
        for g, b in enumerate(alloc):
            wg = W[:, g * G : (g + 1) * G]
            s, o = _group_params(wg, b)
            Wq[:, g * G : (g + 1) * G] = s * _codes(wg, s, o, b) + o
        kl = float(
            torch.nn.functional.kl_div(
                torch.log_softmax(X @ Wq.T, -1), ref, log_target=True, reduction="batchmean"
            )
        )
        best = min(best, (kl, alloc), key=lambda e: e[0])
    return best[1]


def slim_quantize(W, H, X, bits: int, G: int, percdamp: float = 0.01, blocksize: int = 128) -> dict[str, Any]:
    with single_thread():  # thousands of tiny reductions: one thread is far faster on a busy CPU
        return _slim_quantize(W, H, X, bits, G, percdamp, blocksize)


def _slim_quantize(W, H, X, bits: int, G: int, percdamp: float, blocksize: int) -> dict[str, Any]:
    W = W.detach().float().clone()
    rows, cols = W.shape
    W, Hinv = prepare_hessian(W, H.float(), percdamp)
    alloc = allocate_bits(W, Hinv, X, bits, G)
    hdiag = torch.diag(H.float()).clamp(min=1e-12)
    mults = []
    for g, b in enumerate(alloc):  # SQC: per-group scale multiplier, Hessian-weighted error
        wg = W[:, g * G : (g + 1) * G]
        errs = []
        for m in SQC_GRID.tolist():
            s, o = _group_params(wg, b, m)
            q = s * _codes(wg, s, o, b) + o
            errs.append(float((((wg - q) ** 2) * hdiag[g * G : (g + 1) * G]).sum()))
        mults.append(float(SQC_GRID[int(torch.tensor(errs).argmin())]))
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // G)
    offsets = torch.zeros(rows, cols // G)

    def quantize_column(col: int, w: torch.Tensor, current) -> torch.Tensor:
        g = col // G
        if col % G == 0:  # group parameters from the weights as updated so far, as GPTQ does
            s, o = _group_params(current(G), alloc[g], mults[g])
            scales[:, g], offsets[:, g] = s[:, 0], o[:, 0]
        q = _codes(w[:, None], scales[:, g : g + 1], offsets[:, g : g + 1], alloc[g])[:, 0]
        codes[:, col] = q
        return scales[:, g] * q + offsets[:, g]

    gptq_sweep(W, Hinv, quantize_column, blocksize)
    return {"codes": codes, "scales": scales, "offsets": offsets, "alloc": alloc, "mults": mults}


@register_method
class SliMLLM(Method):
    name = "slimllm"
    kinds = {"hessian", "inputs"}
    bit_range = (2, 4)
    default_bits = 2
    default_group_size = 128

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {
            "percdamp": float(options.pop("percdamp", 0.01)),
            "kl_tokens": int(options.pop("kl_tokens", 256)),
        }
        if self.group_size <= 0:
            self.group_size = 128
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> MixedLinear:
        X = stats.all_inputs()
        X = X[:: max(1, X.shape[0] // self.options["kl_tokens"])]
        r = slim_quantize(
            linear.weight, stats.hessian(), X, int(self.bits), self.group_size, self.options["percdamp"]
        )
        self.layer_log[name] = {"mean_bits": sum(r["alloc"]) / len(r["alloc"])}
        return MixedLinear.from_codes(
            r["codes"], r["scales"], r["offsets"], r["alloc"], self.group_size, linear.bias
        )
