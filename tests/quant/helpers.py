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
