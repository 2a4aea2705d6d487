"""QuIP (LDLQ): the mechanism against slow, obviously correct references."""

import torch

from llamalab.quant.quip import Butterfly, QuIPLinear, butterfly_factors, ldlq, quip_quantize

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


def reference_butterfly_dense(b: Butterfly) -> torch.Tensor:
    """The reference's `mul_ortho_butterfly` on the identity, written with explicit loops: permute the rows
    by perm_in, then for each factor stage i multiply every length-p_i fibre (the other indices fixed) by
    its own block, then permute the rows by perm_out."""
    n = b.perm_in.numel()
    p1, p2 = b.second.shape[0], b.first.shape[0]
    x = torch.eye(n, dtype=torch.float64)[b.perm_in.long()]
    y = x.clone()
    for col in range(p2):  # stage 1: fibre over the first index, block `first[col]`
        idx = [a * p2 + col for a in range(p1)]
        y[idx] = b.first[col] @ x[idx]
    x, y = y, y.clone()
    for row in range(p1):  # stage 2: fibre over the second index, block `second[row]`
        idx = [row * p2 + c for c in range(p2)]
        y[idx] = b.second[row] @ x[idx]
    return y[b.perm_out.long()]


def test_butterfly_is_the_references_blocked_transform():
    assert [butterfly_factors(n) for n in (576, 1536, 192, 24, 7)] == [
        (24, 24),
        (32, 48),
        (24, 8),
        (4, 6),
        (7, 1),
    ]
    gen = torch.Generator().manual_seed(0)
    b = Butterfly.random(24, gen)
    assert b.first.shape == (6, 4, 4) and b.second.shape == (4, 6, 6)  # independent blocks per factor
    assert not torch.equal(b.first[0], b.first[1])
    for blocks in (b.first, b.second):  # special orthogonal, as scipy's special_ortho_group draws them
        assert torch.allclose(torch.linalg.det(blocks), torch.ones(len(blocks), dtype=torch.float64))
    M = b.dense()
    assert torch.allclose(M, reference_butterfly_dense(b), atol=1e-12)
    assert torch.allclose(M @ M.T, torch.eye(24, dtype=torch.float64), atol=1e-12)
    assert not torch.equal(b.perm_in, b.perm_out)  # separate input and output permutations
    x = torch.randn(3, 24, dtype=torch.float64)
    assert torch.allclose(b.apply(x), x @ M.T) and torch.allclose(b.apply_transposed(x), x @ M)


def reference_greedy_passes(W, H, start, maxq, npasses):
    """The reference's greedy passes after LDL rounding (`round_ldl`), one code at a time: with s = codes - W
    and H scaled by its largest diagonal entry, each code (columns in reverse) becomes
    round(code - (s H)_k / H_kk); the codes are clamped after each pass (s is not), until a pass changes
    nothing."""
    Hn = H.double() / H.diagonal().max()
    wr, s = start.double().clone(), (start - W).double()
    prev = wr.clone()
    for _ in range(npasses):
        for k in reversed(range(W.shape[1])):
            for r in range(W.shape[0]):
                hs = sum(float(s[r, j]) * float(Hn[j, k]) for j in range(W.shape[1]))
                new = round(float(wr[r, k]) - hs / float(Hn[k, k]))
                s[r, k] -= float(wr[r, k]) - new
                wr[r, k] = new
        wr = wr.clamp(0, maxq)
        if torch.equal(wr, prev):
            break
        prev = wr.clone()
    return wr.float()


def test_greedy_passes_follow_the_reference_and_descend():
    w, x = layer_and_data(rows=6, cols=12)
    H = hessian(x) + 0.01 * torch.eye(12)
    maxq = 3
    Wt = ((w / (2.4 * w.square().mean().sqrt())) + 1) / 2 * maxq
    for n in (1, 3, 20):
        assert torch.equal(
            ldlq(Wt, H, maxq, npasses=n), reference_greedy_passes(Wt, H, ldlq(Wt, H, maxq), maxq, n)
        )
    # Away from the grid's ends the passes are exact coordinate descent: at their fixed point no code moves
    # by one step and lowers tr(S H S^T) (S = codes - W~), which changes by 2 d (S H)[r, k] + d^2 H[k, k].
    w, x = layer_and_data(rows=16, cols=48)
    H = (hessian(x) + 0.01 * torch.eye(48)).double()
    Wt = 128 + 8 * torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    proxy = lambda q: float(torch.trace((q - Wt).double() @ H @ (q - Wt).double().T))  # noqa: E731
    once, greedy = ldlq(Wt, H.float(), 255), ldlq(Wt, H.float(), 255, npasses=100)
    assert torch.equal(greedy, ldlq(Wt, H.float(), 255, npasses=101)) and proxy(greedy) < proxy(once)
    SH = (greedy - Wt).double() @ H
    for d in (-1.0, 1.0):
        assert bool((2 * d * SH + d * d * H.diagonal()[None] >= -1e-6).all())


def test_quip_inference_matches_dequantized_weight_and_beats_rtn():
    w, xs = layer_and_data(rows=48, cols=128)
    H = xs.double().T @ xs.double() / xs.shape[0]
    for bits in (2, 3):
        m = QuIPLinear.from_result(quip_quantize(w, H, bits, seed=1), bits, None)
        W = m.dequantize()
        assert torch.allclose(m(xs[:5]), xs[:5] @ W.T, atol=1e-4)
        assert out_err(w, W, xs) < 0.6 * out_err(w, rtn_weight(w, bits, -1), xs)  # well below RTN per channel


def test_a_quip_checkpoint_of_the_old_layout_is_refused_by_name():
    import pytest

    from llamalab.errors import LlamalabError

    with pytest.raises(LlamalabError, match="older llamalab"):
        QuIPLinear(24, 24, False, 2)  # a stored spec without "layout": one Kronecker product per side
