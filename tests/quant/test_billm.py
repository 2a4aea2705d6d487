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


def _reference_residual(x, mask, order):
    """The reference's `high_order_residual`: fp32 nan-means over the mask, torch.sign."""
    total = torch.zeros_like(x)
    for _ in range(order):
        r = torch.where(mask, x * mask - total, torch.tensor(float("nan")))
        mu = torch.nan_to_num(torch.nanmean(r, 1))
        r = r - mu[:, None]
        alpha = torch.nan_to_num(torch.nanmean(r.abs(), 1))
        total = total + torch.nan_to_num(torch.sign(r) * alpha[:, None] + mu[:, None]) * mask
    return total


def _reference_search(S, up_lim=50):
    """The reference's `structural_searching`, written out slowly: salient columns by the order-2 proxy,
    then the split at one of np.quantile's 81 quantiles of |S * not-salient| over the whole block."""
    import numpy as np

    top = torch.topk(S.abs().sum(0), up_lim).indices
    errs = []
    for k in range(1, up_lim):
        m3 = torch.zeros_like(S, dtype=torch.bool)
        m3[:, top[:k]] = True
        errs.append(float(((S - _reference_residual(S, m3, 2) - _reference_residual(S, ~m3, 2)) ** 2).mean()))
    k = 1 + int(np.argmin(errs))
    m3 = torch.zeros_like(S, dtype=torch.bool)
    m3[:, top[:k]] = True
    g3 = _reference_residual(S, m3, 2)
    flat = (S * ~m3).abs().flatten().numpy()
    splits = np.quantile(flat, np.linspace(0.1, 0.9, 81))
    errs = []
    for t in splits:
        b = (S * ~m3).abs()
        m1, m2 = (b < float(t)) & ~m3, (b >= float(t)) & ~m3
        q = _reference_residual(S, m1, 1) + _reference_residual(S, m2, 1) + g3
        errs.append(float(((S - q) ** 2).mean()))
    return k, float(splits[int(np.argmin(errs))])


def test_billm_search_matches_the_reference_rule():
    from llamalab.quant.billm import billm_block

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        W1 = torch.randn(32, 128, generator=g) * 0.05
        W1[:, :3] *= 6  # salient columns
        S = W1**2 / (torch.rand(128, generator=g) + 0.5) ** 2
        k, split = _reference_search(S)
        b = billm_block(W1, S)
        assert int(b["cols"].sum()) == k
        # the split the reference picks: the same masks (threshold equal up to fp32 rounding of the quantile)
        mine = (S.abs() >= split) & ~b["cols"][None]
        assert torch.equal(b["split"], mine)
