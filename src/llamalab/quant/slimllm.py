"""SliM-LLM: salience-driven mixed-precision groups (SBA) with a salience-weighted scale search (SQC) and
GPTQ compensation.

Paper: Huang, Liu, Qin, Li, Zhang, Magno, Qi, "SliM-LLM: Salience-Driven Mixed-Precision Quantization for
Large Language Models", arXiv 2405.14917. Reference code: Aaronhuang-778/SliM-LLM
`slim-llm/{slim_gptq.py, utils/bitsearch.py, utils/mixed_quantizer.py}`; the LLaMA-3 script quantizes to
2 bits with groups of 128.

Reproduced, per linear (`run.py` / `slim_gptq.py` with the default `--salient_block -1`; H = 2/N X^T X):
- **SBA**, the bit allocation: the reference first damps H in place by 0.01 on the diagonal (dead columns
  set to 1); group salience s_g = sum over the group of W^2 / diag(H_c)^2 with H_c the upper Cholesky factor
  of that H's inverse. For k in 1..n_groups/2 - 1, the k least salient groups at bits-1 and the k most
  salient at bits+1 (the mean stays at `bits`) are round-to-nearest quantized (`block_quantize`: min/max
  with 0 in the range; 1 bit as sign(w - mean) mean|w| + mean), and scored by KL(softmax(X W_q^T) ||
  softmax(X W^T)) with both distributions clamped at 1e-6, summed over the calibration tokens (the
  reference sums per calibration window and averages over windows: the same argmin); the best k is
  applied to the salience recomputed with GPTQ's damping (`fasterquant`: + 0.01 mean diag on the already
  damped H). With fewer than 4 groups there is no k to search (the reference fails there): all groups
  keep `bits`.
- **GPTQ** with blocks of one group: each group's parameters come from the group as compensated when it
  starts. **SQC** (`mixed_quantizer.Quantizer.fit`) at 2+ bits, per output row: the min/max range (with 0)
  scaled by p in {1} U linspace(1, 1.1, 51)[1:] U linspace(1, 0.9, 51)[1:] (the zero point stays the one
  of p = 1), the p minimising sum |w - q|^2.4 over the row, the salient entries (w^2 / diag(Hinv_g)^2 at
  or above the smallest whose z-score over the group exceeds 2) weighted by `lambda_salience` (default 1,
  the reference's). 1-bit groups (`binary_scale`): w = sign(w - mean) mean|w| + mean, no search.

Approximated (stated, not hidden): scale and offset are stored in fp16 and the codes computed with the
stored values (the reference quantizes with fp32 parameters and rounds them to fp16 when it packs); a 1-bit
weight exactly equal to its row mean gets mean - mean|w| (the reference's torch.sign gives the mean).
Storage ("mixed" format): codes of each bit width packed separately, a scale and offset per (row, group)
in fp16 (w = scale * q + offset, which also holds the 1-bit groups), the group bit widths in the
checkpoint's module spec.
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
from llamalab.quant.quantizer import single_thread

SQC_GRID = torch.cat([torch.ones(1), torch.linspace(1, 1.1, 51)[1:], torch.linspace(1, 0.9, 51)[1:]])
SQC_NORM = 2.4  # the reference's `norm`: the error exponent of the scale search


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


def minmax_range(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (xmin, xmax, zero): the range stretched to contain 0 (an all-zero row gets [-1, 1]) and the
    zero point of its 2^bits - 1 steps, as the reference's quantizers compute them."""
    zero_ = torch.zeros(w.shape[0])
    xmin, xmax = torch.minimum(w.min(1).values, zero_), torch.maximum(w.max(1).values, zero_)
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1.0, 1.0
    return xmin, xmax, torch.round(-xmin / ((xmax - xmin) / (2**bits - 1)))


def block_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The allocation search's round-to-nearest of one group (`bitsearch.block_quantize`)."""
    if bits == 1:
        mu, alpha = w.mean(1, keepdim=True), w.abs().mean(1, keepdim=True)
        return torch.sign(w - mu) * alpha + mu
    maxq = 2**bits - 1
    xmin, xmax, zero = minmax_range(w, bits)
    scale = ((xmax - xmin) / maxq)[:, None]
    return scale * (torch.clamp(torch.round(w / scale) + zero[:, None], 0, maxq) - zero[:, None])


def salient_entries(sensitivity: torch.Tensor) -> torch.Tensor:
    """`salient_mask.saliency_mask`: entries at or above the smallest one whose z-score over the whole group
    exceeds 2 in magnitude (none when no entry does)."""
    z = (sensitivity - sensitivity.mean()) / sensitivity.std()
    outliers = sensitivity[z.abs() > 2]
    if outliers.numel() == 0:
        return torch.zeros_like(sensitivity, dtype=torch.bool)
    return sensitivity >= outliers.min()


def group_params(
    w: torch.Tensor, hinv_diag: torch.Tensor, bits: int, lambda_salience: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per row, fp16-rounded, of one group as GPTQ reaches it: SQC's per-row range search at
    2+ bits, the mean-centred binarizer at 1 bit (see the module docstring)."""
    if bits == 1:
        mu, alpha = w.mean(1, keepdim=True), w.abs().mean(1, keepdim=True)
        return (2 * alpha).half().float(), (mu - alpha).half().float()
    maxq = 2**bits - 1
    xmin, xmax, zero = minmax_range(w, bits)
    scale = (xmax - xmin) / maxq
    weight = torch.where(salient_entries(w**2 / hinv_diag[None] ** 2), lambda_salience, 1.0)
    best = torch.full((w.shape[0],), float("inf"))
    for p in SQC_GRID.tolist():
        scale1 = (p * xmax - p * xmin) / maxq
        zero1 = torch.round(-(p * xmin) / scale1)
        q = scale1[:, None] * (
            torch.clamp(torch.round(w / scale1[:, None]) + zero1[:, None], 0, maxq) - zero1[:, None]
        )
        err = (((q - w).abs() ** SQC_NORM) * weight).sum(1)
        better = err < best
        best[better], scale[better], zero[better] = err[better], scale1[better], zero1[better]
    return scale[:, None].half().float(), (-scale * zero)[:, None].half().float()


def _codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round((w - offset) / scale.clamp(min=1e-12)), 0, 2**bits - 1)


def _upper_inverse_factor(H: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def group_salience(W: torch.Tensor, Hinv: torch.Tensor, G: int) -> torch.Tensor:
    S = W**2 / torch.diag(Hinv).reshape(1, -1) ** 2
    return S.view(W.shape[0], -1, G).sum((0, 2))


def labels(salience: torch.Tensor, k: int, bits: int) -> list[int]:
    """Bit widths: the k least salient groups at bits-1, the k most salient at bits+1, the rest at bits."""
    order = torch.argsort(salience).tolist()
    alloc = [bits] * len(order)
    for g in order[:k]:
        alloc[g] = bits - 1
    for g in order[len(order) - k :] if k else []:
        alloc[g] = bits + 1
    return alloc


def output_kl(X: torch.Tensor, Wq: torch.Tensor, Y: torch.Tensor, chunk: int = 4096) -> float:
    """The reference's `kl_div(X Wq^T, Y)`: KL(softmax(X Wq^T) || softmax(Y)) over the output features, both
    probabilities clamped at 1e-6, summed over tokens."""
    total = 0.0
    for i in range(0, X.shape[0], chunk):
        pq = torch.softmax(X[i : i + chunk] @ Wq.T, -1).clamp(min=1e-6)
        po = torch.softmax(Y[i : i + chunk], -1).clamp(min=1e-6)
        total += float((pq * (pq.log() - po.log())).sum())
    return total


def search_k(W: torch.Tensor, salience: torch.Tensor, X: torch.Tensor, bits: int, G: int) -> int:
    """SBA's k: the allocation whose round-to-nearest weights give the output distribution nearest the
    original's (k in 1..n_groups/2 - 1; 0 when there is none)."""
    Y = X @ W.T
    best = (float("inf"), 0)
    for k in range(1, salience.numel() // 2):
        Wq = torch.cat(
            [block_quantize(W[:, g * G : (g + 1) * G], b) for g, b in enumerate(labels(salience, k, bits))], 1
        )
        best = min(best, (output_kl(X, Wq, Y), k), key=lambda e: e[0])
    return best[1]


def slim_quantize(
    W, H, X, bits: int, G: int, percdamp: float = 0.01, lambda_salience: float = 1.0
) -> dict[str, Any]:
    with single_thread():  # thousands of tiny reductions: one thread is far faster on a busy CPU
        return _slim_quantize(W, H, X, bits, G, percdamp, lambda_salience)


def _slim_quantize(W, H, X, bits: int, G: int, percdamp: float, lambda_salience: float) -> dict[str, Any]:
    W = W.detach().float().clone()
    rows, cols = W.shape
    # The reference damps H in place by 0.01 (dead columns to 1) for the allocation's salience; GPTQ then
    # finds no dead column left and adds its own damping on top.
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += 0.01 * torch.eye(cols)
    k = search_k(W, group_salience(W, _upper_inverse_factor(H), G), X.float(), bits, G)
    W, Hinv = prepare_hessian(W, H, percdamp)
    alloc = labels(group_salience(W, Hinv, G), k, bits)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // G)
    offsets = torch.zeros(rows, cols // G)

    def quantize_column(col: int, w: torch.Tensor, current) -> torch.Tensor:
        g = col // G
        if col % G == 0:  # SQC on the group as compensated so far, as the reference fits each block
            hinv_diag = torch.diag(Hinv)[col : col + G]
            s, o = group_params(current(G), hinv_diag, alloc[g], lambda_salience)
            scales[:, g], offsets[:, g] = s[:, 0], o[:, 0]
        q = _codes(w[:, None], scales[:, g : g + 1], offsets[:, g : g + 1], alloc[g])[:, 0]
        codes[:, col] = q
        return scales[:, g] * q + offsets[:, g]

    gptq_sweep(W, Hinv, quantize_column, blocksize=G)
    return {"codes": codes, "scales": scales, "offsets": offsets, "alloc": alloc, "k": k}


@register_method
class SliMLLM(Method):
    name = "slimllm"
    revision = 2  # the reference's SQC (per row, |w - q|^2.4, on the compensated group) and SBA (KL, k >= 1)
    kinds = {"hessian", "inputs"}
    bit_range = (2, 4)
    default_bits = 2
    default_group_size = 128

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {
            "percdamp": float(options.pop("percdamp", 0.01)),
            "kl_tokens": int(options.pop("kl_tokens", 0)),  # 0: every calibration token, as the reference
            "lambda_salience": float(options.pop("lambda_salience", 1.0)),
        }
        if self.group_size <= 0:
            self.group_size = 128
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> MixedLinear:
        o = self.options
        X = stats.all_inputs()
        if o["kl_tokens"]:
            X = X[:: max(1, X.shape[0] // o["kl_tokens"])]
        r = slim_quantize(
            linear.weight,
            stats.hessian(),
            X,
            int(self.bits),
            self.group_size,
            o["percdamp"],
            o["lambda_salience"],
        )
        self.layer_log[name] = {"mean_bits": sum(r["alloc"]) / len(r["alloc"])}
        return MixedLinear.from_codes(
            r["codes"], r["scales"], r["offsets"], r["alloc"], self.group_size, linear.bias
        )
