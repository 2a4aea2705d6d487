"""Bounds for bf16 results that hold on any CPU: an independent fp32 reference, and PyTorch's own bf16 error
against it, measured in the same run on the same machine.

A hand-picked tolerance ("2e-2 of the largest logit") is tuned to one CPU's rounding and can be loose enough
to hide a real error. Instead, a bf16 result from the native kernels must be about as close to the fp32
reference (the same weights in fp32 through plain PyTorch, kernels off) as PyTorch's bf16 computation of the
same thing is. Greedy choices may differ from the reference only where its top two logits are closer than
twice the error allowed: a near-tie, named as such.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from llamalab import kernels

# Independent roundings of the same computation. Measured on quantized tiny models (3 seeds x 6 formats) and
# on the real model (RTN int4, NF4): the native step's RMS error is 0.8-1.3x PyTorch bf16's and its largest
# error 0.8-1.5x; a kernel fault (a wrong scale, a lost tile, a skipped rounding) shows as several times more.
RMS_FACTOR = 2.0
MAX_FACTOR = 3.0


@contextmanager
def kernels_off() -> Iterator[None]:
    """Plain PyTorch everywhere (LLAMALAB_KERNELS=0) for the duration."""
    saved = os.environ.get("LLAMALAB_KERNELS")
    os.environ["LLAMALAB_KERNELS"] = "0"
    kernels.reset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LLAMALAB_KERNELS", None)
        else:
            os.environ["LLAMALAB_KERNELS"] = saved
        kernels.reset()


def pytorch_fp32_and_bf16(module: torch.nn.Module, run: Callable[[torch.nn.Module], torch.Tensor]):
    """`run` on an fp32 copy of `module` (the reference) and on `module` itself, both in plain PyTorch with the
    native kernels off: (reference, PyTorch's bf16 result), as fp32. The copy holds exactly the same weights
    (bf16 values are exact in fp32)."""
    with kernels_off(), torch.inference_mode():
        reference = run(copy.deepcopy(module).float()).float()
        bf16 = run(module).float()
    return reference, bf16


def rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def assert_bf16_as_close_as_pytorch(got: torch.Tensor, reference: torch.Tensor, pytorch_bf16: torch.Tensor):
    """`got` is within the error PyTorch's own bf16 computation makes against the fp32 `reference`."""
    got = got.float()
    budget = (pytorch_bf16 - reference).abs()
    err = (got - reference).abs()
    assert float(budget.max()) > 0, "the bf16 result equals the fp32 reference: not a bf16 computation"
    assert rms(err) <= RMS_FACTOR * rms(budget), (
        f"RMS error {rms(err):.3g} against fp32, PyTorch bf16's is {rms(budget):.3g}"
    )
    assert float(err.max()) <= MAX_FACTOR * float(budget.max()), (
        f"largest error {float(err.max()):.3g} against fp32, PyTorch bf16's is {float(budget.max()):.3g}"
    )


def assert_same_greedy_choices_except_near_ties(
    got: torch.Tensor, reference: torch.Tensor, pytorch_bf16: torch.Tensor
) -> None:
    """Row by row (logits, vocabulary last), `got` picks the fp32 reference's token, except where the
    reference's best logit leads the one `got` picked by no more than twice the error
    `assert_bf16_as_close_as_pytorch` allows: a near-tie, which bf16 rounding may legitimately flip."""
    margin = 2 * MAX_FACTOR * float((pytorch_bf16 - reference).abs().max())
    best = reference.max(-1).values
    picked = reference.gather(-1, got.float().argmax(-1, keepdim=True)).squeeze(-1)
    lead = best - picked
    assert bool((lead <= margin).all()), (
        f"greedy choices differ beyond a near-tie: leads {lead.tolist()}, margin {margin:.3g}"
    )
