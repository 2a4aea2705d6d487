"""DB-LLM: the mechanism against slow, obviously correct references."""

import torch

from .helpers import hessian, layer_and_data, out_err, rtn_weight


def test_dbllm_dual_binary_levels_and_fit():
    from llamalab.quant.dbllm import fdb_fit

    w, x = layer_and_data(rows=48, cols=256)
    r = fdb_fit(w, torch.diag(hessian(x)), 64)
    rep = lambda t: t.repeat_interleave(64, 1)  # noqa: E731
    W = rep(r["alpha1"]) * r["b1"] + rep(r["alpha2"]) * r["b2"] + rep(r["beta"])
    assert W[0, :64].unique().numel() <= 4  # two binary planes: at most four levels per group
    assert out_err(w, W, x) < 0.6 * out_err(w, rtn_weight(w, 2, 64), x)
