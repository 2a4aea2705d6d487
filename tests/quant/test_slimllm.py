"""SliM-LLM: the mechanism against slow, obviously correct references."""

from .helpers import hessian, layer_and_data, out_err, rtn_weight


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
    assert out_err(w, W, x) < out_err(w, gw, x) < out_err(w, rtn_weight(w, 2, 32), x)


def reference_sqc(w, hinv_diag, bits, lam=1.0):
    """`mixed_quantizer.Quantizer.fit` at 2+ bits, row by row: nan-masked errors over the non-salient and
    salient entries, |q - w|^2.4, the first p of the grid with the smallest error kept."""
    import torch

    maxq = 2**bits - 1
    sens = w**2 / hinv_diag[None] ** 2
    z = (sens - sens.mean()) / sens.std()
    outl = sens[z.abs() > 2]
    mask1 = sens >= outl.min() if outl.numel() else torch.zeros_like(sens, dtype=torch.bool)
    grid = [1.0] + torch.linspace(1.0, 1.1, 51)[1:].tolist() + torch.linspace(1.0, 0.9, 51)[1:].tolist()
    scales, zeros = [], []
    for r in range(w.shape[0]):
        x = w[r]
        xmin, xmax = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if xmin == 0 and xmax == 0:
            xmin, xmax = -1.0, 1.0
        scale = torch.tensor((xmax - xmin) / maxq)
        zero = torch.round(torch.tensor(-xmin) / scale)
        best = float("inf")
        for p in grid:
            s1 = (
                torch.tensor(p, dtype=torch.float32) * xmax - torch.tensor(p, dtype=torch.float32) * xmin
            ) / maxq
            z1 = torch.round(-(torch.tensor(p, dtype=torch.float32) * xmin) / s1)
            q = s1 * (torch.clamp(torch.round(x / s1) + z1, 0, maxq) - z1)
            e = (q - x).abs() ** 2.4
            err = float(torch.nansum(torch.where(~mask1[r], e, torch.nan))) + lam * float(
                torch.nansum(torch.where(mask1[r], e, torch.nan))
            )
            if err < best:
                best, scale, zero = err, s1, z1
        scales.append(float(scale))
        zeros.append(float(zero))
    return torch.tensor(scales), torch.tensor(zeros)


def test_sqc_searches_each_row_as_the_reference_does():
    import torch

    from llamalab.quant.slimllm import group_params

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 32, generator=g) * 0.05
    w[3, 5] = 0.6  # a salient outlier
    hinv_diag = torch.rand(32, generator=g) + 0.5
    for bits, lam in ((2, 1.0), (3, 1.0), (2, 4.0)):
        scale, zero = reference_sqc(w, hinv_diag, bits, lam)
        s, o = group_params(w, hinv_diag, bits, lam)
        assert torch.equal(s[:, 0], scale.half().float())
        assert torch.equal(o[:, 0], (-scale * zero).half().float())
    s, o = group_params(w, hinv_diag, 1)  # 1 bit: scale mean|w| around the mean (`binary_scale`)
    mu, alpha = w.mean(1), w.abs().mean(1)
    assert torch.equal(s[:, 0], (2 * alpha).half().float()) and torch.equal(
        o[:, 0], (mu - alpha).half().float()
    )


def test_bit_allocation_picks_the_references_k():
    """`activation_aware_search` per calibration window (its kl_div on (1, T, out) outputs, batchmean over
    the leading 1), errors averaged over windows, k = argmin + 1."""
    import torch
    import torch.nn.functional as F

    from llamalab.quant.slimllm import block_quantize, group_salience, labels, search_k

    w, x = layer_and_data(rows=40, cols=256)
    G, bits = 32, 2
    H = hessian(x) + 0.01 * torch.eye(256)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    sal = group_salience(w, Hinv, G)
    windows = x.view(4, 128, 256)
    errors = []
    for win in windows:
        out = (win @ w.T)[None]
        per_k = []
        for k in range(1, 8 // 2):
            alloc = labels(sal, k, bits)
            wq = torch.cat([block_quantize(w[:, i * G : (i + 1) * G], b) for i, b in enumerate(alloc)], 1)
            t1 = F.softmax(win @ wq.T, -1).clamp(min=1e-6)
            t2 = F.softmax(out, -1).clamp(min=1e-6)
            per_k.append(float(F.kl_div(torch.log(t2), t1, reduction="batchmean")))
        errors.append(per_k)
    mean = torch.tensor(errors).mean(0)
    assert search_k(w, sal, x, bits, G) == int(mean.argmin()) + 1
    assert labels(sal, 2, bits).count(1) == 2 and labels(sal, 2, bits).count(3) == 2
