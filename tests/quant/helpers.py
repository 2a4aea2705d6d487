"""Small correlated layers for mechanism tests: activations with outlier channels, like an LLM's."""

import torch


def layer_and_data(rows=48, cols=128, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :4] *= 8  # a few outlier input channels
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def hessian(x):
    return 2.0 / x.shape[0] * (x.double().T @ x.double()).float()


def out_err(w, wq, x):
    return float(((x @ w.T - x @ wq.T) ** 2).mean())


def rtn_weight(w, bits, G):
    """The round-to-nearest weight (min-max per group of G columns) the methods are compared with."""
    from llamalab.quant.quantizer import group_affine

    q, s, z = group_affine(w, bits, G, convention="minmax")
    g = w.shape[1] if G <= 0 else G
    return s.repeat_interleave(g, 1) * (q.float() - z.repeat_interleave(g, 1))
