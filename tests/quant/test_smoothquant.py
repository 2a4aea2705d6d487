"""SmoothQuant: the mechanism against slow, obviously correct references."""

import torch
from torch import nn

from llamalab.quant.smoothquant import SmoothQuantLinear, int_mm_is_exact, quantize_per_token, smooth_ln_fcs


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
        m.prepare()  # torch._int_mm: int8 x int8 -> int32, where it is exact on this CPU
        assert m.kernel == ("int_mm" if int_mm_is_exact() else None)
        assert torch.allclose(m(xs), ref, rtol=1e-5, atol=1e-5)


def test_int_mm_probe_finds_a_saturating_int8_product(monkeypatch):
    """Without VNNI, oneDNN's u8 x s8 pair sums saturate at int16 (ONEDNN_MAX_CPU_ISA=AVX2 shows it): the probe
    compares extreme values with an int64 product, so a product that clips them is not used."""
    import llamalab.quant.smoothquant as sq

    def saturating(a, b):  # int16 saturation of each pair of u8 (a + 128) x s8 products, as VPMADDUBSW
        u = a.long() + 128
        pairs = (u[:, 0::2, None] * b.long()[0::2] + u[:, 1::2, None] * b.long()[1::2]).clamp(-32768, 32767)
        return (pairs.sum(1) - 128 * b.long().sum(0)).int()

    sq.int_mm_is_exact.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", saturating)
    try:
        assert not sq.int_mm_is_exact()
        m = SmoothQuantLinear.from_weight(torch.randn(16, 64), None, 8, 8)
        m.prepare()
        assert m.kernel is None  # the float path
    finally:
        sq.int_mm_is_exact.cache_clear()
