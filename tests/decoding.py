"""Decoding a tiny or real model step by step with the fused native decode step on or off, for the tests that
hold the step to the PyTorch path (tests/model/test_fused_decode.py, tests/quant/test_native_kernels.py)."""

from __future__ import annotations

import pytest
import torch

import llamalab.model.transformer as transformer
from llamalab.kv.dense import DenseCache
from llamalab.model import fused_decode


def decode(model, ids: torch.Tensor, fused: bool, steps: int = 8):
    """Prefill all but the last `steps` tokens, then decode them one at a time: (logits of the steps, cache)."""
    cache = DenseCache.for_model(model.config, ids.shape[1], dtype=model.model.embed_tokens.weight.dtype)
    P = ids.shape[1] - steps
    calls = []
    real = fused_decode.fused_decode_logits

    def spy(*args):
        out = real(*args) if fused else None
        calls.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(transformer, "fused_decode_logits", spy)
        model(ids[:, :P], 0, cache)
        out = [model(ids[:, t : t + 1], t, cache)[0, -1] for t in range(P, ids.shape[1])]
    assert calls == [fused] * steps, "the native step was not taken (or taken when it must not be)"
    return torch.stack(out).float(), cache
