"""BiLLM: post-training 1-bit LLMs (structured salient columns with residual binarization, a split search
for the rest, error compensation between blocks).

Paper: Huang, Liu, Qin, Li, Zhang, Magno, Qi, "BiLLM: Pushing the Limit of Post-Training Quantization for
LLMs", arXiv 2402.04291. Reference code: Aaronhuang-778/BiLLM `bigptq.py`, `binary.py`,
`utils/{structure,autosearch,mask}.py` (`run.py <model> c4 braq --blocksize 128 --salient_metric hessian`).

Reproduced, per block of 128 columns (a shorter last block when the width is not a multiple): salience
S = W^2 / diag(H_c)^2 with H_c the upper Cholesky factor of H^-1 (damp 0.01); salient columns = the top-k
columns by sum_rows |S|, k in 1..49 (`up_lim` 50) chosen by the error of binarizing S's salient part with
order-2 residual binarization and the rest with order 2 as a proxy; the non-salient weights split at one of
the 81 quantiles 0.10..0.90 of |S * not-salient| (over the whole block, the salient columns' zeros included,
as the reference's `structural_searching` takes them) into two groups, each binarized to order 1, the
quantile chosen by total error (both searches run on S itself in fp32, as the reference does); the block is
binarized from its *un-updated* weights (no in-block GPTQ step) and only its error is propagated to later
blocks, W[:, end:] -= ((W1 - Q1) / diag(H_c1)) @ H_c[block, end:]. `high_order_residual`: order times,
mu = row-mean over the mask, alpha = row-mean |r - mu|, add (sign(r - mu) alpha + mu) on the mask; the
stored binarization rounds mu and alpha to fp16 (its storage), the searches keep them in fp32.

Approximated: sign(0) is taken as +1 (stored in one bit; the reference's torch.sign gives 0). The stored
bits per weight count the per-weight split mask, both sign planes and 8 fp16 parameters per (row, block):
about 3 bits on SmolLM2's small layers, against the paper's ~1.1 nominal which leaves them out.
Calibration in the reference: C4, 128 x 2048, seed 0; offline we use the shipped text (recorded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamalab.quant.binary import BiLLMLinear, signs
from llamalab.quant.calib import Stats
from llamalab.quant.gptq import prepare_hessian
from llamalab.quant.methods import Method, register_method
from llamalab.quant.quantizer import single_thread


def high_order_residual(
    x: torch.Tensor, mask: torch.Tensor, order: int, fp16: bool = True
) -> tuple[torch.Tensor, list]:
    """Residual binarization of x's masked entries per row; returns the approximation and, per order,
    (mu, alpha, sign >= 0), with mu and alpha rounded to fp16 as stored (`fp16=False`: kept in fp32, as
    the reference's searches compute them)."""
    rounded = (lambda t: t.half().float()) if fp16 else (lambda t: t)
    out = torch.zeros_like(x)
    cnt = mask.sum(1, keepdim=True).clamp(min=1)
    parts = []
    for _ in range(order):
        r = (x - out) * mask
        mu = rounded(r.sum(1, keepdim=True) / cnt)
        alpha = rounded(((r - mu).abs() * mask).sum(1, keepdim=True) / cnt)
        s = signs(r - mu)
        out = out + (s * alpha + mu) * mask
        parts.append((mu[:, 0], alpha[:, 0], (r - mu) >= 0))
    return out, parts


def _err(x: torch.Tensor, masks_orders: list[tuple[torch.Tensor, int]]) -> float:
    approx = sum(high_order_residual(x, m, o, fp16=False)[0] for m, o in masks_orders)
    covered = sum(m.float() for m, _ in masks_orders)
    return float(((x * covered - approx) ** 2).sum())


def linear_quantiles(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """numpy's default (linear) quantiles of a 1-D tensor from one sort, at any size (torch.quantile stops at
    2**24 elements)."""
    s = x.sort().values
    pos = q.double() * (s.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=s.numel() - 1)
    frac = (pos - lo).to(s.dtype)
    return s[lo] + (s[hi] - s[lo]) * frac


def billm_block(W1: torch.Tensor, S: torch.Tensor, up_lim: int = 50) -> dict[str, Any]:
    rows, n = W1.shape
    order = torch.argsort(S.abs().sum(0), descending=True)
    best = (float("inf"), 1)
    for k in range(1, min(up_lim, n)):
        m3 = torch.zeros(rows, n, dtype=torch.bool)
        m3[:, order[:k]] = True
        best = min(best, (_err(S, [(m3, 2), (~m3, 2)]), k))
    cols = torch.zeros(n, dtype=torch.bool)
    cols[order[: best[1]]] = True
    m3 = cols[None].expand(rows, n)
    flat = (S * ~m3).abs().flatten()
    best_split = (float("inf"), None)
    for t in linear_quantiles(flat, torch.linspace(0.1, 0.9, 81)):
        m1 = (S.abs() < t) & ~m3
        m2 = (S.abs() >= t) & ~m3
        best_split = min(best_split, (_err(S, [(m1, 1), (m2, 1)]), float(t)), key=lambda e: e[0])
    t = best_split[1]
    m1 = (S.abs() < t) & ~m3
    m2 = (S.abs() >= t) & ~m3
    q1, p1 = high_order_residual(W1, m1, 1)
    q2, p2 = high_order_residual(W1, m2, 1)
    q3, p3 = high_order_residual(W1, m3, 2)
    sign1 = torch.where(m1, p1[0][2], torch.where(m2, p2[0][2], p3[0][2]))
    params = torch.stack([p1[0][0], p1[0][1], p2[0][0], p2[0][1], p3[0][0], p3[0][1], p3[1][0], p3[1][1]], 1)
    return {"q": q1 + q2 + q3, "cols": cols, "split": m2, "sign1": sign1, "sign2": p3[1][2], "params": params}


def billm_quantize(
    W: torch.Tensor, H: torch.Tensor, blocksize: int = 128, percdamp: float = 0.01
) -> dict[str, Any]:
    W = W.detach().float().clone()
    rows, cols = W.shape
    W, Hinv = prepare_hessian(W, H.float(), percdamp)
    out = {"q": torch.zeros_like(W), "cols": torch.zeros(cols, dtype=torch.bool),
           "split": torch.zeros_like(W, dtype=torch.bool), "sign1": torch.zeros_like(W, dtype=torch.bool),
           "sign2": torch.zeros_like(W, dtype=torch.bool), "params": []}  # fmt: skip
    with single_thread():
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Hinv1 = Hinv[i1:i2, i1:i2]
            S = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            b = billm_block(W1, S)
            for k in ("q", "split", "sign1", "sign2"):
                out[k][:, i1:i2] = b[k]
            out["cols"][i1:i2] = b["cols"]
            out["params"].append(b["params"])
            Err1 = (W1 - b["q"]) / torch.diag(Hinv1).reshape(1, -1)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out["params"] = torch.stack(out["params"], 1)  # (rows, n_blocks, 8)
    return out


@register_method
class BiLLM(Method):
    name = "billm"
    revision = 2  # quantiles over the whole block, fp32 search
    kinds = {"hessian"}
    bit_range = (1, 1.2)
    default_bits = 1.1
    default_group_size = 128
    ragged_groups = True

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"percdamp": float(options.pop("percdamp", 0.01)), "blocksize": 128,
               "true_sequential": bool(options.pop("true_sequential", False))}  # fmt: skip
        if self.group_size > 0:
            out["blocksize"] = self.group_size
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> BiLLMLinear:
        B = self.options["blocksize"]
        r = billm_quantize(linear.weight, stats.hessian(), B, self.options["percdamp"])
        return BiLLMLinear.from_parts(
            r["cols"], r["split"], r["sign1"], r["sign2"], r["params"], B, linear.bias
        )
