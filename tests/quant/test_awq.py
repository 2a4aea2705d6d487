"""AWQ: the mechanism against slow, obviously correct references."""

import torch
from torch import nn

from llamalab.quant.awq import awq_fake_quant, search_clip, search_scale

from .helpers import layer_and_data


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
