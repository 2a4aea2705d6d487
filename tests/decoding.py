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


def assert_bf16_within_pytorch_error(model, ids, got, steps=8):
    """`got`, bf16 logits of the native decode step, against the model in fp32 (plain PyTorch), as close as
    PyTorch's own bf16 decode, with the same greedy choices except near-ties (tests/bf16_reference.py)."""
    reference, pytorch_bf16 = pytorch_fp32_and_bf16(model, lambda m: decode(m, ids, False, steps)[0])
    assert_bf16_as_close_as_pytorch(got, reference, pytorch_bf16)
    assert_same_greedy_choices_except_near_ties(got, reference, pytorch_bf16)
