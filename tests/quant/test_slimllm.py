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
