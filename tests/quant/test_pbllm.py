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
