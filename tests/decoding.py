"""Decoding a tiny or real model step by step through the native decode step or the PyTorch path, and the
bound both bf16 paths are held to: their distance from an fp32 reference (tests/generate/test_native_step.py,
tests/quant/test_native_kernels.py)."""

from __future__ import annotations

import copy

import torch

from llamalab.generate.native_step import NativeDecoder
from llamalab.kv.dense import DenseCache


def decode(model, ids: torch.Tensor, native: bool, steps: int = 8):
    """Prefill all but the last `steps` tokens of `ids` (1, T), then decode them one at a time (teacher
    forced) through the native step or the model's PyTorch forward: (logits of the steps (steps, V), cache)."""
    dtype = model.model.embed_tokens.weight.dtype
    cache = DenseCache.for_model(model.config, ids.shape[1], dtype=dtype)
    P = ids.shape[1] - steps
    with torch.inference_mode():
        model(ids[:, :P], 0, cache)
        step = None
        if native:
            step, why = NativeDecoder.create(model, cache)
            assert step is not None, f"the native step was not taken: {why}"
        out = []
        for t in range(P, ids.shape[1]):
            token = ids[:, t : t + 1]
            logits = step(token, [t], [0]) if native else model(token, t, cache)
            out.append(logits[0, -1])
    return torch.stack(out).float(), cache


def fp32_logits(model, ids: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """The same teacher-forced steps by an fp32 copy of `model` (its bf16 weights, exactly, in fp32)."""
    reference = copy.deepcopy(model).float()
    return decode(reference, ids, native=False, steps=steps)[0]


def assert_bf16_paths_agree(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """The native step's bf16 logits `got` are no further from the fp32 reference `exact` than the PyTorch
    path's `ref` is, give or take its own rounding noise (twice the PyTorch path's error plus two bf16 ulps of
    the largest logit): how far bf16 lands from fp32 depends on the CPU's kernels (with or without AMX), a
    kernel bug does not stay within it. Where fp32's top choice is clear of both paths' noise, both pick it."""
    err_ref = (ref - exact).abs().max()
    err_got = (got - exact).abs().max()
    ulp = 2.0**-7 * float(exact.abs().max())
    assert err_got <= 2 * err_ref + 2 * ulp, (
        f"native step {err_got:.4f} from fp32, PyTorch path {err_ref:.4f}"
    )
    # A step's choice can only move where the two top logits' errors exceed their margin.
    step_err = torch.maximum((ref - exact).abs().amax(-1), (got - exact).abs().amax(-1))
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * step_err
    assert torch.equal(got.argmax(-1)[clear], exact.argmax(-1)[clear])
    assert torch.equal(ref.argmax(-1)[clear], exact.argmax(-1)[clear])
