"""Mechanism tests for SmoothQuant, QuIP (LDLQ), PB-LLM and BiLLM against slow, obvious references."""

import torch
from torch import nn

from llamalab.quant.billm import billm_quantize, high_order_residual
from llamalab.quant.binary import BiLLMLinear, PBLinear
from llamalab.quant.pbllm import pbllm_quantize
from llamalab.quant.quantizer import group_affine
from llamalab.quant.quip import QuIPLinear, apply_u, apply_vt, ldlq, ortho_dense, quip_quantize, random_ortho
from llamalab.quant.smoothquant import SmoothQuantLinear, quantize_per_token, smooth_ln_fcs

from .helpers import hessian, layer_and_data, out_err


def _rtn(w, bits, G):
    q, s, z = group_affine(w, bits, G, convention="minmax")
    g = w.shape[1] if G <= 0 else G
    return s.repeat_interleave(g, 1) * (q.float() - z.repeat_interleave(g, 1))


def test_smoothquant_smoothing_preserves_the_function_and_w8a8_is_integer_exact():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    x[:, 3] *= 30  # an outlier channel
    ln_w = torch.rand(64) + 0.5
    ln = nn.Module()
    ln.weight = nn.Parameter(ln_w.clone())
    fcs = [nn.Linear(64, 16, bias=False), nn.Linear(64, 8, bias=False)]
    before = [fc(x * ln_w) for fc in fcs]
    act_max = (x * ln_w).abs().amax(0)
    s = smooth_ln_fcs(ln, fcs, act_max, 0.5)
    for fc, b in zip(fcs, before):
        assert torch.allclose(fc(x * ln.weight), b, atol=1e-4)  # X diag(s)^-1 . diag(s) W^T
    wmax = torch.cat([fc.weight.abs().amax(0, keepdim=True) / s for fc in fcs]).amax(0)
    assert torch.allclose(s, act_max.pow(0.5) / wmax.pow(0.5), rtol=1e-4)
    # the smoothed activation range is flatter: max/median of per-channel maxima shrinks
    xs = x * ln.weight
    assert xs.abs().amax(0).max() / xs.abs().amax(0).median() < act_max.max() / act_max.median()
    w = fcs[0].weight.detach()
    for bits in (8, 6, 4):
        m = SmoothQuantLinear.from_weight(w, None, bits, bits)
        xq, sx = quantize_per_token(xs, bits)
        qmax = 2 ** (bits - 1) - 1
        sw = (w.abs().amax(1) / qmax).half().float()
        wq = torch.round(w / sw[:, None]).clamp(-qmax, qmax)
        ref = (xq @ wq.T) * sx * sw
        assert torch.allclose(m(xs), ref, rtol=1e-5, atol=1e-5)
        m.prepare()  # torch._int_mm: int8 x int8 -> int32
        assert m.kernel == "int_mm" and torch.allclose(m(xs), ref, rtol=1e-5, atol=1e-5)


def test_ldlq_equals_gptq_rounding_in_reverse_column_order():
    w, x = layer_and_data(rows=16, cols=48)
    H = hessian(x) + 0.01 * torch.eye(48)
    maxq = 7
    Wt = ((w / (2.4 * w.square().mean().sqrt())) + 1) / 2 * maxq
    ours = ldlq(Wt, H, maxq)
    # GPTQ/OBQ rounding on the reversed columns: quantize a column, spread its error with the inverse Hessian
    Wr, Hr = Wt[:, range(47, -1, -1)].double().clone(), H[range(47, -1, -1)][:, range(47, -1, -1)].double()
    Hinv = torch.linalg.inv(Hr)
    Q = torch.zeros_like(Wr)
    for j in range(48):
        Q[:, j] = torch.clamp(torch.round(Wr[:, j]), 0, maxq)
        err = (Wr[:, j] - Q[:, j]) / Hinv[j, j]
        Wr[:, j:] -= err[:, None] * Hinv[j, j:][None]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1] / Hinv[j, j]
    assert torch.equal(ours, Q[:, range(47, -1, -1)].float())


def test_quip_transforms_are_orthogonal_and_inference_matches_dequantized_weight():
    gen = torch.Generator().manual_seed(0)
    A, B, p = random_ortho(24, gen)
    V = ortho_dense(A, B, p).float()
    assert torch.allclose(V @ V.T, torch.eye(24), atol=1e-5)
    x = torch.randn(3, 24)
    assert torch.allclose(apply_vt(x, A.float(), B.float(), p), x @ V.T, atol=1e-5)
    assert torch.allclose(apply_u(x, A.float(), B.float(), torch.argsort(p)), x @ V, atol=1e-5)
    w, xs = layer_and_data(rows=48, cols=128)
    H = xs.double().T @ xs.double() / xs.shape[0]
    for bits in (2, 3):
        m = QuIPLinear.from_result(quip_quantize(w, H, bits, seed=1), bits, None)
        W = m.dequantize()
        assert torch.allclose(m(xs[:5]), xs[:5] @ W.T, atol=1e-4)
        assert out_err(w, W, xs) < 0.6 * out_err(w, _rtn(w, bits, -1), xs)  # well below RTN per channel


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
    assert out_err(w, r["weight"], x) < 0.5 * out_err(w, _rtn(w, 2, 128), x)
    no_comp = pbllm_quantize(w, torch.eye(256) * 1e3 + H * 1e-9, 0.9, group_size=128)["weight"]
    assert out_err(w, r["weight"], x) < out_err(w, no_comp, x)


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
    assert out_err(w, r["q"], xs) < 0.2 * out_err(w, _rtn(w, 1, 128), xs)


def test_slimllm_mixed_bits_keep_the_mean_and_beat_gptq_at_the_same_budget():
    from llamalab.quant.gptq import gptq_quantize
    from llamalab.quant.slimllm import MixedLinear, slim_quantize

    w, x = layer_and_data(rows=48, cols=256)
    H = hessian(x)
    r = slim_quantize(w, H, x[:256], 2, 32)
    assert sum(r["alloc"]) == 2 * len(r["alloc"]) and set(r["alloc"]) <= {1, 2, 3}
    m = MixedLinear.from_codes(r["codes"], r["scales"], r["offsets"], r["alloc"], 32, None)
    W = m.dequantize()
    g = gptq_quantize(w, H, 2, 32)
    gw = g["scales"].repeat_interleave(32, 1) * (g["codes"].float() - g["zeros"].repeat_interleave(32, 1))
    assert out_err(w, W, x) < out_err(w, gw, x) < out_err(w, _rtn(w, 2, 32), x)


def test_dbllm_dual_binary_levels_and_fit():
    from llamalab.quant.dbllm import fdb_fit

    w, x = layer_and_data(rows=48, cols=256)
    r = fdb_fit(w, torch.diag(hessian(x)), 64)
    rep = lambda t: t.repeat_interleave(64, 1)  # noqa: E731
    W = rep(r["alpha1"]) * r["b1"] + rep(r["alpha2"]) * r["b2"] + rep(r["beta"])
    assert W[0, :64].unique().numel() <= 4  # two binary planes: at most four levels per group
    assert out_err(w, W, x) < 0.6 * out_err(w, _rtn(w, 2, 64), x)
