"""QuIP (LDLQ): the mechanism against slow, obviously correct references."""

import torch

from llamalab.quant.quip import QuIPLinear, apply_u, apply_vt, ldlq, ortho_dense, quip_quantize, random_ortho

from .helpers import hessian, layer_and_data, out_err, rtn_weight


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
        assert out_err(w, W, xs) < 0.6 * out_err(w, rtn_weight(w, bits, -1), xs)  # well below RTN per channel
