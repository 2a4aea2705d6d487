"""PB-LLM: partially binarized LLMs (Hessian-salient weights kept at 8 bits, the rest binarized, GPTQ
error compensation).

Paper: Shang, Yuan, Wu, Dong, "PB-LLM: Partially Binarized Large Language Models", arXiv 2310.00034.
Reference code: hahnyuan/PB-LLM `gptq_pb/{gptq,low_quant,high_quant,run}.py` (`LowHighGPT.fasterquant`).

Reproduced as in the reference: H^-1's upper Cholesky factor H_c (damp 0.01); per column group of
`group_size` (128 as in the study; a shorter last group as the reference's ceil allows; -1, the reference's
`--groupsize` default, makes the whole input width one group, as its `LowQuantizer` does: one salience
quantile over the matrix, one mu/alpha per row), salience W^2 / diag(H_c)^2 and the lowest `low_frac` of it
binarized (mask from the original W, before any update); the binarizer "xnor" with
mu = mean(W * mask) and alpha = mean|W * mask - mu| over the group's columns per row (computed, as in the
reference, on the masked weights with the salient entries as zeros); salient weights quantized by an
8-bit per-channel asymmetric GPTQ quantizer calibrated on the whole W; GPTQ column loop (block 128)
with in-block and lazy updates. `--bits` is the paper's nominal average, low_frac = (8 - bits) / 7
(1.7 bits = 90% binarized); the stored bits per weight (mask, signs, 8-bit salient codes, mu/alpha, scales)
are reported separately and are higher. Calibration in the reference: C4, 128 x 2048, seed 0; offline we use
the shipped text (recorded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamalab.quant.binary import PBLinear, signs
from llamalab.quant.calib import Stats
from llamalab.quant.gptq import gptq_sweep, prepare_hessian
from llamalab.quant.methods import Method, register_method
from llamalab.quant.quantizer import affine_params, quantize


def pbllm_quantize(
    W: torch.Tensor, H: torch.Tensor, low_frac: float, high_bits: int = 8, group_size: int = 128,
    blocksize: int = 128, percdamp: float = 0.01,
) -> dict[str, Any]:  # fmt: skip
    W = W.detach().float().clone()
    rows, cols = W.shape
    high = affine_params(W, high_bits, False, "gptq")
    W, Hinv = prepare_hessian(W, H.float(), percdamp)
    G = group_size if group_size > 0 else cols  # -1: one group spanning the whole width (the reference's)
    ng = -(-cols // G)
    low = torch.zeros_like(W, dtype=torch.bool)
    mu = torch.zeros(rows, ng)
    alpha = torch.zeros(rows, ng)
    for g in range(ng):
        st, ed = g * G, min((g + 1) * G, cols)
        sal = W[:, st:ed] ** 2 / torch.diag(Hinv[st:ed, st:ed]).reshape(1, -1) ** 2
        thresh = torch.sort(sal.flatten()).values[min(int(sal.numel() * low_frac), sal.numel() - 1)]
        low[:, st:ed] = sal <= thresh
        wm = W[:, st:ed] * low[:, st:ed]
        mu[:, g] = wm.mean(-1)
        alpha[:, g] = (wm - mu[:, g : g + 1]).abs().mean(-1)
    mu, alpha = mu.half().float(), alpha.half().float()  # stored in fp16: compensate what is stored
    Q = torch.zeros_like(W)
    high_q = torch.zeros_like(W)
    sign_pos = torch.zeros_like(W, dtype=torch.bool)

    def quantize_column(col: int, w: torch.Tensor, current) -> torch.Tensor:
        g = col // G
        hq = quantize(w.unsqueeze(1), high).flatten()
        q_high = high.scale[:, 0] * (hq - high.zero[:, 0])
        pos = w - mu[:, g] >= 0
        q_low = signs(w - mu[:, g]) * alpha[:, g] + mu[:, g]
        q = torch.where(low[:, col], q_low, q_high)
        Q[:, col], high_q[:, col], sign_pos[:, col] = q, hq, pos
        return q

    loss = gptq_sweep(W, Hinv, quantize_column, blocksize)
    return {"weight": Q, "low": low, "sign_pos": sign_pos, "high_q": high_q, "high": high, "mu": mu,
            "alpha": alpha, "loss": loss}  # fmt: skip


@register_method
class PBLLM(Method):
    name = "pbllm"
    kinds = {"hessian"}
    bit_range = (1.1, 8)
    default_bits = 1.7
    default_group_size = 128
    ragged_groups = True

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"high_bits": int(options.pop("high_bits", 8)), "percdamp": float(options.pop("percdamp", 0.01)),
               "true_sequential": bool(options.pop("true_sequential", False))}  # fmt: skip
        out["low_frac"] = round((out["high_bits"] - float(self.bits)) / (out["high_bits"] - 1), 6)
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> PBLinear:
        o = self.options
        group = self.group_size if self.group_size > 0 else linear.in_features  # -1: the whole width
        r = pbllm_quantize(linear.weight, stats.hessian(), o["low_frac"], o["high_bits"], group, 128,
                           o["percdamp"])  # fmt: skip
        self.layer_log[name] = {"loss": r["loss"]}
        return PBLinear.from_parts(
            r["low"], r["sign_pos"], r["high_q"], r["high"].scale[:, 0], r["high"].zero[:, 0], r["mu"], r["alpha"],
            group, o["high_bits"], linear.bias,
        )  # fmt: skip
