"""Fitting AQUA-KV's predictors on calibration text, as the reference's `train_predictors.py` does:

- calibration windows (`llamalab.quant.calib`: the shipped text's first 75% by default, GPTQ-style random
  windows) are embedded and run through the *unquantized* model one block at a time; each block's keys
  (before RoPE) and values are caught on the way through the KV seam;
- layer 0 is quantized directly with the 4-bit grid; for layer l >= 1 the key predictor is fitted from
  layer l-1's *reconstructed* keys to layer l's keys, the keys are reconstructed (prediction + quantized
  residual), then the value predictor is fitted from [reconstructed keys of l, reconstructed values of
  l-1] to the values of l and the values are reconstructed: training inputs are what inference will see;
- a held-out share of the windows (`valid`, the reference's 32 of 256) is kept out of the fit and used to
  report each predictor's relative MSE ||pred - Y||^2 / ||Y||^2 and "equivalent bits" -log4(relMSE);
- like the reference, calibration ignores the sink tokens and the full-precision buffer.
"""

from __future__ import annotations

import math
import time

import torch

from llamalab.errors import LlamalabError
from llamalab.kv.base import KVCache
from llamalab.kv.parts.higgs import Higgs, grid_for_bits
from llamalab.kv.parts.predictors import Predictors, Ridge, fingerprint
from llamalab.model.attention import AttnContext
from llamalab.model.rope import rope_cos_sin


class _Catch(KVCache):
    """A pass-through cache that keeps the pre-RoPE keys and values attention hands it."""

    max_batch = max_len = 0

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def attend(self, layer, q, k, v, ctx, attention):
        self.k, self.v = k, v
        return attention(ctx.rotate(q), ctx.rotate(k), v, None)  # plain causal attention over the window

    def nbytes(self) -> int:
        return 0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(n, H, L, D) -> (n, L, H*D): heads side by side per token."""
    n, H, L, D = x.shape
    return x.transpose(1, 2).reshape(n, L, H * D)


def _rel_mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-30))


def _bits(rel: float) -> float:
    return -math.log(max(rel, 1e-30)) / math.log(4)


@torch.inference_mode()
def calibrate(
    llm,
    ids: torch.Tensor,
    bits: float = 2.0,
    grid_dim: int = 2,
    group: int | None = None,
    ridge: float = 1e-3,
    valid: int | None = None,
    seed: int = 0,
    first_layer_bits: float = 4.0,
    progress: bool = True,
    chunk: int = 4,
) -> Predictors:
    """Fit key and value predictors of every layer l >= 1 on calibration windows `ids` (n, L)."""
    from tqdm import tqdm

    from llamalab.kv.aquakv import default_group

    model, config = llm.model, llm.model.config
    n = ids.shape[0]
    valid = max(1, n // 8) if valid is None else valid
    if not 0 < valid < n:
        raise LlamalabError(f"need at least 2 calibration windows to hold {valid} out; got {n}")
    C = config.num_key_value_heads * config.head_dim
    group = group or default_group(C)
    quantizer = Higgs(C, group, grid_dim, grid_for_bits(bits, grid_dim))
    first = Higgs(C, group, 2, grid_for_bits(first_layer_bits, 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_rows, valid_rows = order[valid:], order[:valid]

    t0 = time.perf_counter()
    dtype = model.model.embed_tokens.weight.dtype
    x = model.model.embed_tokens(ids).to(dtype)  # (n, L, d)
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = rope_cos_sin(model.inv_freq, positions, model.attention_factor, dtype)
    catch = _Catch()
    out = Predictors()
    records = []
    prev_k = prev_v = None
    for layer, block in enumerate(
        tqdm(model.model.layers, desc="calibrate", unit="layer", disable=not progress)
    ):
        ks, vs, outs = [], [], []
        for s in range(0, n, chunk):
            xc = x[s : s + chunk]
            b = xc.shape[0]
            ctx = AttnContext(cos.expand(b, -1, -1), sin.expand(b, -1, -1), catch, list(range(b)), [0] * b)
            outs.append(block(xc, ctx))
            ks.append(_flat(catch.k).float())
            vs.append(_flat(catch.v).float())
        x = torch.cat(outs)  # the unquantized model's hidden states go on (the reference propagates them)
        k, v = torch.cat(ks), torch.cat(vs)  # (n, L, C)
        record = {"layer": layer}
        if layer == 0:
            rec_k, rec_v = (
                first.quantize_dequantize(k.reshape(-1, C)),
                first.quantize_dequantize(v.reshape(-1, C)),
            )
            rec_k, rec_v = rec_k.reshape(k.shape), rec_v.reshape(v.shape)
        else:
            rec_k, record["key"] = _fit(out.key, layer, prev_k, k, quantizer, ridge, train_rows, valid_rows)
            inp = torch.cat([rec_k, prev_v], -1)
            rec_v, record["value"] = _fit(out.value, layer, inp, v, quantizer, ridge, train_rows, valid_rows)
        record["recon_rel_mse_k"] = _rel_mse(rec_k, k)
        record["recon_rel_mse_v"] = _rel_mse(rec_v, v)
        records.append(record)
        prev_k, prev_v = rec_k, rec_v
    out.meta = {
        "method": "aquakv",
        "model": {"name": llm.name, **fingerprint(config)},
        "bits": float(bits),
        "grid_dim": grid_dim,
        "group_size": group,
        "first_layer_bits": first_layer_bits,
        "ridge": ridge,
        "windows": n,
        "window_tokens": ids.shape[1],
        "valid_windows": valid,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "layers": records,
    }
    return out


def _fit(table, layer, inputs, targets, quantizer, ridge, train_rows, valid_rows):
    """Fit one predictor (inputs -> targets, both (n, L, *)) on the training windows, store it in `table`,
    and return the reconstruction of every window (prediction + quantized residual) and the errors."""
    C = targets.shape[-1]
    r = Ridge(inputs.shape[-1], C)
    for i in train_rows.tolist():
        r.add(inputs[i], targets[i])
    w, b = r.solve(ridge)
    table[layer] = (w, b)
    pred = torch.addmm(b, inputs.reshape(-1, inputs.shape[-1]), w.T).reshape(targets.shape)
    rec = pred + quantizer.quantize_dequantize((targets - pred).reshape(-1, C)).reshape(targets.shape)
    errors = {}
    for name, rows in (("train", train_rows), ("valid", valid_rows)):
        rel = _rel_mse(pred[rows], targets[rows])
        errors[f"rel_mse_{name}"] = rel
        errors[f"equiv_bits_{name}"] = _bits(rel)
    return rec, errors
