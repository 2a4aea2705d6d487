"""BiLLM: the mechanism against slow, obviously correct references."""

import torch

from llamalab.quant.billm import billm_quantize, high_order_residual
from llamalab.quant.binary import BiLLMLinear

from .helpers import hessian, layer_and_data, out_err, rtn_weight


def test_billm_residual_binarization_and_storage():
    x = torch.randn(4, 16)
    mask = torch.rand(4, 16) > 0.5
    approx, parts = high_order_residual(x, mask, 2)
    r0 = x * mask
    cnt = mask.sum(1, keepdim=True)
    mu = r0.sum(1, keepdim=True) / cnt
    alpha = ((r0 - mu).abs() * mask).sum(1, keepdim=True) / cnt
    b1 = (torch.where(r0 - mu >= 0, 1.0, -1.0) * alpha + mu) * mask
    assert torch.allclose(parts[0][0], mu[:, 0].half().float()) and torch.allclose(
        parts[0][1], alpha[:, 0].half().float()
    )
    assert ((x * mask - approx) ** 2).sum() < ((x * mask - b1) ** 2).sum()  # order 2 beats order 1
    w, xs = layer_and_data(rows=48, cols=256)
    r = billm_quantize(w, hessian(xs))
    m = BiLLMLinear.from_parts(r["cols"], r["split"], r["sign1"], r["sign2"], r["params"], 128, None)
    assert torch.equal(m.dequantize(), r["q"])
    assert 1 <= int(r["cols"][:128].sum()) < 50  # structured salient columns per block
    assert out_err(w, r["q"], xs) < 0.2 * out_err(w, rtn_weight(w, 1, 128), xs)
