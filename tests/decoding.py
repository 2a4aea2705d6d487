"""Decoding a tiny or real model step by step through the native decode step or the PyTorch path, and the
bound both bf16 paths are held to: their distance from an fp32 reference (tests/generate/test_native_step.py,
tests/quant/test_native_kernels.py)."""

from __future__ import annotations

import torch

from llamalab.generate.native_step import NativeDecoder
from llamalab.kv.dense import DenseCache
from tests.bf16_reference import (
    assert_bf16_as_close_as_pytorch,
    assert_same_greedy_choices_except_near_ties,
    pytorch_fp32_and_bf16,
)


def decode(model, ids: torch.Tensor, native: bool, steps: int = 8, cache=None, rows=(0,), chunk=None):
    """Prefill all but the last `steps` tokens of `ids` (B, T) into `rows` of `cache` (default: a dense cache
    of T positions), `chunk` tokens at a time (default: all at once), then decode the last `steps` one at a
    time (teacher forced) through the native step or the model's PyTorch forward: (logits of the steps,
    (steps, V) for one sequence and (steps, B, V) for several; the cache)."""
    dtype = model.model.norm.weight.dtype
    cache = DenseCache.for_model(model.config, ids.shape[1], dtype=dtype) if cache is None else cache
    B, P, rows = ids.shape[0], ids.shape[1] - steps, list(rows)
    with torch.inference_mode():
        for s in range(0, P, chunk or P):
            model(ids[:, s : min(P, s + (chunk or P))], [s] * B, cache, rows=rows)
        step = None
        if native:
            step, why = NativeDecoder.create(model, cache)
            assert step is not None, f"the native step was not taken: {why}"
        out = []
        for t in range(P, ids.shape[1]):
            token = ids[:, t : t + 1]
            logits = step(token, [t] * B, rows) if native else model(token, [t] * B, cache, rows=rows)
            out.append(logits[:, -1])
    logits = torch.stack(out).float()
    return (logits[:, 0] if B == 1 else logits), cache


def assert_bf16_within_pytorch_error(model, ids, got, steps=8):
    """`got`, bf16 logits of the native decode step, against the model in fp32 (plain PyTorch), as close as
    PyTorch's own bf16 decode, with the same greedy choices except near-ties (tests/bf16_reference.py)."""
    reference, pytorch_bf16 = pytorch_fp32_and_bf16(model, lambda m: decode(m, ids, False, steps)[0])
    assert_bf16_as_close_as_pytorch(got, reference, pytorch_bf16)
    assert_same_greedy_choices_except_near_ties(got, reference, pytorch_bf16)
