"""GPTQ: accurate post-training quantization with approximate second-order error compensation.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323. Reference code: IST-DASLab/gptq `gptq.py::GPTQ.fasterquant`,
`quant.py` (the same code sits in the LLaMA3 study repo and inside BiLLM, PB-LLM, QuIP and SliM-LLM).

Reproduced as in the reference: H = 2/N sum x x^T from layer-sequential calibration; dead columns (H_jj =
0) zeroed; damping `percdamp` (0.01) x mean diag(H); the upper Cholesky factor of H^-1; blocks of 128
columns with in-block updates and lazy batch updates of the rest; group parameters found when a group
starts, from the weights as updated so far (the global W, as the reference reads it); act-order (columns by
decreasing diag(H)); static groups (parameters from the un-permuted W up front). The quantizer is GPTQ's
(range contains 0; `sym` uses zero = (maxq+1)/2). IST defaults: per-channel, asymmetric, act-order, static
groups and true-sequential off; the CLI exposes each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llamalab.quant.base import UniformQuantLinear
from llamalab.quant.calib import Stats
from llamalab.quant.methods import Method, register_method
from llamalab.quant.quantizer import AffineParams, affine_params, quantize, single_thread


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero dead columns, damp, and return (W, upper Cholesky factor of H^-1), as `fasterquant` does."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0])
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return W, torch.linalg.cholesky(Hinv, upper=True)


ColumnQuantizer = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


def gptq_sweep(
    W: torch.Tensor, Hinv: torch.Tensor, quantize_column: ColumnQuantizer, blocksize: int = 128
) -> float:
    """GPTQ's error-compensating column sweep (`fasterquant`'s loop), shared by GPTQ, PB-LLM and SliM-LLM.

    Columns of W (rows, cols) are quantized left to right by `quantize_column(col, w, current)`, which
    returns the dequantized values for `w`, the column as compensated so far; `current(n)` gives the current
    values of columns col..col+n-1, for parameters chosen on the fly. Each column's error, divided by its
    diagonal entry of Hinv (the upper Cholesky factor of H^-1), is pushed onto the columns not yet quantized:
    at once inside its block of `blocksize` columns, and as one matmul onto the rest when the block ends
    ("lazy batch updates"). W itself is updated only then, block by block, as in the reference. Returns the
    reference's loss, sum((w - q)^2 / d^2) / 2."""
    cols = W.shape[1]
    loss = torch.zeros(())
    with single_thread():  # thousands of small ops: one thread is faster than two
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i]
                q = quantize_column(
                    i1 + i, w, lambda n, W1=W1, i=i, i2=i2: torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :n]
                )
                err = (w - q) / Hinv1[i, i]
                loss += (err**2).sum() / 2
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return float(loss)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> dict[str, Any]:
    """GPTQ on one weight matrix W (rows, cols) with Hessian H (cols, cols).

    Returns codes (rows, cols) int, scales/zeros (rows, n_groups), `perm` (or None) and the reported loss
    sum (w - q)^2 / d^2 / 2. Without act-order, or with static groups, codes and groups are in the original
    column order; with act-order and dynamic groups they are in permuted order (see UniformQuantLinear)."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    G = cols if group_size <= 0 else group_size
    params = affine_params(W, bits, sym, "gptq")  # per-channel parameters, from the original W
    H = H.float()
    dead = torch.diag(H) == 0
    groups: list[AffineParams] = []
    if static_groups and group_size > 0:
        Wz = W.clone()
        Wz[:, dead] = 0
        groups = [affine_params(Wz[:, i : i + G], bits, sym, "gptq") for i in range(0, cols, G)]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    W, Hinv = prepare_hessian(W, H, percdamp)
    Q = torch.zeros_like(W)
    n_groups = cols // G
    scales = torch.empty(rows, n_groups)
    zeros = torch.empty(rows, n_groups)

    def quantize_column(col: int, w: torch.Tensor, current) -> torch.Tensor:
        nonlocal params
        if group_size > 0:
            if not static_groups:
                if col % G == 0:  # from the global W, stale inside a block, as the reference reads it
                    params = affine_params(W[:, col : col + G], bits, sym, "gptq")
                    scales[:, col // G], zeros[:, col // G] = params.scale[:, 0], params.zero[:, 0]
            else:
                params = groups[(int(perm[col]) if perm is not None else col) // G]
        q = quantize(w.unsqueeze(1), params).flatten()
        Q[:, col] = q
        return params.scale[:, 0] * (q - params.zero[:, 0])

    loss = gptq_sweep(W, Hinv, quantize_column, blocksize)
    if group_size <= 0:
        scales[:, 0], zeros[:, 0] = params.scale[:, 0], params.zero[:, 0]
    elif static_groups:
        scales = torch.cat([g.scale for g in groups], 1)
        zeros = torch.cat([g.zero for g in groups], 1)
    keep_perm = perm is not None and group_size > 0 and not static_groups
    if perm is not None and not keep_perm:
        Q = Q[:, torch.argsort(perm)]
    return {
        "codes": Q.to(torch.uint8),
        "scales": scales,
        "zeros": zeros,
        "perm": perm if keep_perm else None,
        "loss": loss,
    }


@register_method
class GPTQ(Method):
    name = "gptq"
    kinds = {"hessian"}
    bit_range = (2, 8)
    default_bits = 4
    default_group_size = -1

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {
            "sym": bool(options.pop("sym", False)),
            "act_order": bool(options.pop("act_order", False)),
            "static_groups": bool(options.pop("static_groups", False)),
            "true_sequential": bool(options.pop("true_sequential", False)),
            "percdamp": float(options.pop("percdamp", 0.01)),
            "blocksize": int(options.pop("blocksize", 128)),
        }
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> UniformQuantLinear:
        o = self.options
        r = gptq_quantize(
            linear.weight, stats.hessian(), int(self.bits), self.group_size, o["sym"], o["act_order"],
            o["static_groups"], o["percdamp"], o["blocksize"],
        )  # fmt: skip
        self.layer_log[name] = {"loss": r["loss"]}
        return UniformQuantLinear.from_codes(
            r["codes"], r["scales"], r["zeros"], int(self.bits), self.group_size, linear.bias, r["perm"]
        )
