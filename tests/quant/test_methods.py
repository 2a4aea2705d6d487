"""Mechanism tests for RTN, GPTQ, AWQ and NF4 against slow, obviously correct references."""

import torch
from torch import nn

from llamalab.quant.awq import awq_fake_quant, search_clip, search_scale
from llamalab.quant.gptq import gptq_quantize
from llamalab.quant.nf4 import NF4_TABLE, NF4Linear, create_normal_map, pack_nf4, unpack_nf4
from llamalab.quant.quantizer import affine_params, fake_quantize, group_affine

from .helpers import hessian, layer_and_data, out_err


def _deq(r, bits, G, cols):
    g = cols if G <= 0 else G
    w = r["scales"].repeat_interleave(g, 1) * (r["codes"].float() - r["zeros"].repeat_interleave(g, 1))
    return w if r["perm"] is None else w[:, torch.argsort(r["perm"])]


def naive_gptq(w, H, bits, percdamp=0.01):
    """OBQ-style reference: quantize column j, spread its error with the full inverse Hessian, remove j
    from the inverse by Gaussian elimination; fp64, no blocks, no Cholesky."""
    W = w.double().clone()
    H = H.double().clone()
    H += percdamp * H.diag().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    p = affine_params(w, bits, convention="gptq")
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = fake_quantize(W[:, j : j + 1].float(), p).double()[:, 0]
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q.float()


def test_gptq_matches_the_naive_obq_reference():
    w, x = layer_and_data(rows=24, cols=64)
    H = hessian(x)
    r = gptq_quantize(w, H, 3, blocksize=16)  # several lazy blocks
    ours = _deq(r, 3, -1, 64)
    ref = naive_gptq(w, H, 3)
    assert (ours - ref).abs().max() < 1e-5  # the same codes: lazy blocks + Cholesky change nothing


def test_gptq_output_error_below_rtn_on_the_same_layer_and_data():
    w, x = layer_and_data()
    H = hessian(x)
    for bits, G in [(4, -1), (3, 32), (2, 32)]:
        q, s, z = group_affine(w, bits, G, convention="gptq")
        g = 128 if G <= 0 else G
        rtn = s.repeat_interleave(g, 1) * (q.float() - z.repeat_interleave(g, 1))
        for opts in [{}, {"act_order": True}, {"act_order": True, "static_groups": True}]:
            r = gptq_quantize(w, H, bits, G, **opts)
            gq = _deq(r, bits, G, 128)
            assert out_err(w, gq, x) < 0.8 * out_err(w, rtn, x), (bits, G, opts)


def test_gptq_static_groups_keep_original_order_and_dynamic_act_order_stores_perm():
    w, x = layer_and_data(cols=128)
    H = hessian(x)
    assert gptq_quantize(w, H, 4, 32, act_order=True, static_groups=True)["perm"] is None
    r = gptq_quantize(w, H, 4, 32, act_order=True)
    assert torch.equal(r["perm"], torch.argsort(torch.diag(H), descending=True))


def test_awq_search_picks_the_loss_minimising_ratio():
    w, x = layer_and_data(rows=32, cols=64, tokens=256)
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.data.copy_(w)
    x_mean = x.abs().mean(0)
    scales, ratio, history = search_scale([lin], x_mean, lambda: lin(x), bits=3, group_size=32)
    assert torch.equal(lin.weight.data, w)  # restored
    # brute force, written out: each ratio's scales, fake-quantized weight, output MSE
    losses = []
    for r in range(20):
        s = x_mean.pow(r / 20).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = awq_fake_quant(w * s, 3, 32) / s
        losses.append(float(((x @ w.T - x @ wq.T) ** 2).mean()))
    assert ratio == min(range(20), key=lambda i: losses[i]) / 20
    assert torch.allclose(torch.tensor(history), torch.tensor(losses), rtol=1e-4)
    assert history[int(ratio * 20)] <= history[0]  # never worse than plain RTN (ratio 0)


def test_awq_clip_search_picks_the_best_range_per_group():
    w, x = layer_and_data(rows=8, cols=64, tokens=128)
    best = search_clip(w, x, bits=3, group_size=32)
    wg = w.view(8, 2, 32)
    for r in range(8):
        for g in range(2):
            xs = x[:, g * 32 : (g + 1) * 32]
            errs = []
            for i in range(10):
                m = wg[r, g].abs().max() * (1 - i / 20)
                q = awq_fake_quant(wg[r, g].clamp(-m, m)[None], 3, -1)[0]
                errs.append((float(((xs @ wg[r, g] - xs @ q) ** 2).mean()), float(m)))
            assert abs(float(best[r, g, 0]) - min(errs)[1]) < 1e-6


def test_nf4_table_quantiles_nearest_and_high_nibble_first():
    assert torch.allclose(create_normal_map(), NF4_TABLE, atol=1e-6)
    assert len(set(NF4_TABLE.tolist())) == 16
    assert pack_nf4(torch.tensor([1, 2])).tolist() == [0x12]
    codes = torch.randint(0, 16, (256,), dtype=torch.uint8)
    assert torch.equal(unpack_nf4(pack_nf4(codes)), codes)
    w = torch.randn(32, 128) * 0.02
    m = NF4Linear.from_weight(w, None, 64, double_quant=False)
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    ref = NF4_TABLE[(blocks / absmax).unsqueeze(-1).sub(NF4_TABLE).abs().argmin(-1)] * absmax
    assert torch.allclose(m.dequantize().view(-1, 64), ref, atol=1e-7)
    dq = NF4Linear.from_weight(w, None, 64, double_quant=True)
    assert torch.allclose(dq.block_absmax(), absmax[:, 0], rtol=0.02)  # 8-bit dynamic map of the absmax
    assert dq.nbytes < m.nbytes and dq.bits_per_weight < 4.2  # 4 + 8/64 + tiny
