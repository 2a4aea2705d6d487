"""PB-LLM: the mechanism against slow, obviously correct references."""

import torch

from llamalab.quant.binary import PBLinear
from llamalab.quant.pbllm import pbllm_quantize

from .helpers import hessian, layer_and_data, out_err, rtn_weight


def test_pbllm_salience_binarizer_and_compensation():
    w, x = layer_and_data(rows=32, cols=256)
    H = hessian(x)
    r = pbllm_quantize(w, H, low_frac=0.9, group_size=128)
    assert abs(r["low"].float().mean() - 0.9) < 0.01  # 90% binarized = the paper's 1.7 bits
    # binarized entries take exactly two values per (row, group): mu +- alpha
    row = r["weight"][0, :128][r["low"][0, :128]]
    assert torch.allclose(
        row.unique(),
        torch.stack([r["mu"][0, 0] - r["alpha"][0, 0], r["mu"][0, 0] + r["alpha"][0, 0]]).unique(),
    )
    m = PBLinear.from_parts(r["low"], r["sign_pos"], r["high_q"], r["high"].scale[:, 0], r["high"].zero[:, 0],
                            r["mu"], r["alpha"], 128, 8, None)  # fmt: skip
    assert torch.equal(m.dequantize(), r["weight"])
    # far below 1- and 2-bit RTN, and the GPTQ compensation helps: compare with the same masks without it
    assert out_err(w, r["weight"], x) < 0.5 * out_err(w, rtn_weight(w, 2, 128), x)
    no_comp = pbllm_quantize(w, torch.eye(256) * 1e3 + H * 1e-9, 0.9, group_size=128)["weight"]
    assert out_err(w, r["weight"], x) < out_err(w, no_comp, x)


def pbllm_whole_width_reference(W, H, low_frac, high_bits=8, percdamp=0.01):
    """PB-LLM with `--groupsize -1` written out element by element, in fp64: the reference's LowQuantizer
    sets groupsize = in_features, so the salience quantile is taken over the whole matrix and mu/alpha are
    one pair per row over all its columns."""
    W = W.double().clone()
    rows, cols = W.shape
    H = H.double() + percdamp * H.diag().mean().double() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # upper Cholesky factor of H^-1
    sal = [[W[r, c].item() ** 2 / U[c, c].item() ** 2 for c in range(cols)] for r in range(rows)]
    thresh = sorted(v for row in sal for v in row)[int(rows * cols * low_frac)]
    low = [[sal[r][c] <= thresh for c in range(cols)] for r in range(rows)]
    mu, alpha, scale, zero = [], [], [], []
    maxq = 2**high_bits - 1
    for r in range(rows):
        masked = [W[r, c].item() if low[r][c] else 0.0 for c in range(cols)]
        m = sum(masked) / cols
        mu.append(float(torch.tensor(m).half()))  # stored in fp16
        alpha.append(float(torch.tensor(sum(abs(v - m) for v in masked) / cols).half()))
        lo, hi = min(min(W[r].tolist()), 0.0), max(max(W[r].tolist()), 0.0)  # GPTQ's range includes 0
        scale.append(float(torch.tensor((hi - lo) / maxq).half()))
        zero.append(round(-lo / scale[-1]))
    Q = torch.zeros_like(W)
    for c in range(cols):
        for r in range(rows):
            w = W[r, c].item()
            if low[r][c]:
                Q[r, c] = (alpha[r] if w - mu[r] >= 0 else -alpha[r]) + mu[r]
            else:
                q = min(max(round(w / scale[r]) + zero[r], 0), maxq)
                Q[r, c] = scale[r] * (q - zero[r])
        err = (W[:, c] - Q[:, c]) / U[c, c]  # GPTQ: push the error onto the columns not yet quantized
        W[:, c:] -= err[:, None] * U[c, c:][None, :]
    return Q, torch.tensor(low), torch.tensor(mu, dtype=Q.dtype), torch.tensor(alpha, dtype=Q.dtype)


def test_pbllm_group_size_minus_one_is_one_group_over_the_whole_width():
    from llamalab.quant.calib import Stats
    from llamalab.quant.pbllm import PBLLM

    w, x = layer_and_data(rows=16, cols=256, seed=1)
    H = hessian(x)
    r = pbllm_quantize(w, H, low_frac=0.9, group_size=-1)
    Q, low, mu, alpha = pbllm_whole_width_reference(w, H, 0.9)
    assert torch.equal(r["low"], low)
    assert r["mu"].shape == (16, 1) and torch.allclose(r["mu"][:, 0].double(), mu, rtol=1e-3, atol=1e-6)
    assert torch.allclose(r["alpha"][:, 0].double(), alpha, rtol=1e-3, atol=1e-6)
    assert torch.allclose(r["weight"].double(), Q, atol=1e-5)  # fp32 with lazy block updates vs fp64 plain
    # -1 is not 128 on a 256-wide layer: one quantile over the matrix vs one per 128 columns ...
    g = pbllm_quantize(w, H, low_frac=0.9, group_size=128)
    assert g["mu"].shape == (16, 2) and not torch.equal(g["low"], r["low"])
    assert [round(float(g["low"][:, s : s + 128].float().mean()), 2) for s in (0, 128)] == [0.9, 0.9]
    # ... but is exactly 128 where the width is 128 (one group either way)
    assert torch.equal(pbllm_quantize(w[:, :128], H[:128, :128], 0.9, group_size=-1)["weight"],
                       pbllm_quantize(w[:, :128], H[:128, :128], 0.9, group_size=128)["weight"])  # fmt: skip
    # the method keeps -1 (recorded as asked) and stores one group as wide as the layer
    m = PBLLM(1.7, -1)
    assert m.group_size == -1 and m.settings()["group_size"] == -1
    stats = Stats()
    stats.n, stats.xtx = x.shape[0], x.double().T @ x.double()
    lin = torch.nn.Linear(256, 16, bias=False)
    lin.weight.data.copy_(w)
    q = m.quantize_linear("l", lin, stats)
    assert q.group_size == 256 and torch.allclose(q.dequantize(), r["weight"], atol=1e-6)
