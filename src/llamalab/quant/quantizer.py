"""Uniform affine quantizers, with the conventions of each reference implementation.

The references disagree in ways that matter at 2-3 bits (research note §2.0), so the convention is a
parameter rather than a hidden choice:

- `"gptq"` (IST-DASLab/gptq `quant.py`): the range always contains 0 (xmin <= 0 <= xmax), an all-zero row
  gets [-1, 1], `scale = (xmax - xmin) / maxq`, `zero = round(-xmin / scale)`; symmetric uses
  xmax = max(|xmin|, xmax) and `zero = (maxq + 1) / 2`.
- `"minmax"` (llm-awq `pseudo_quantize_tensor`, OmniQuant's UniformAffineQuantizer used by the study's RTN
  rows): raw min/max, `scale = clamp((max - min) / maxq, 1e-5)`, `zero = clamp(-round(min / scale), 0, maxq)`;
  symmetric: `scale = absmax / (2**(b-1) - 1)`, `zero = 2**(b-1)`.

Every scale is rounded to fp16 before the codes are computed, because fp16 is how scales are stored:
the codes are then optimal for the scale that is actually used at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AffineParams:
    """Per-row (or per-row-per-group) scale and integer zero point: w ~= scale * (q - zero)."""

    scale: torch.Tensor  # (rows, 1) fp32 holding fp16-representable values
    zero: torch.Tensor  # (rows, 1) fp32 holding integers in [0, maxq]
    maxq: int


def affine_params(w: torch.Tensor, bits: int, sym: bool = False, convention: str = "gptq") -> AffineParams:
    """Scale and zero per row of `w` (rows, cols)."""
    maxq = 2**bits - 1
    w = w.float()
    if convention == "gptq":
        xmin = w.min(1, keepdim=True).values.clamp(max=0)
        xmax = w.max(1, keepdim=True).values.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        dead = (xmin == 0) & (xmax == 0)
        xmin = torch.where(dead, -1.0, xmin)
        xmax = torch.where(dead, 1.0, xmax)
        scale = _fp16((xmax - xmin) / maxq)
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    elif convention == "minmax":
        if sym:
            half = 2 ** (bits - 1)
            scale = _fp16((w.abs().amax(1, keepdim=True) / (half - 1)).clamp(min=1e-5))
            zero = torch.full_like(scale, half)
        else:
            xmin = w.min(1, keepdim=True).values
            xmax = w.max(1, keepdim=True).values
            scale = _fp16(((xmax - xmin) / maxq).clamp(min=1e-5))
            zero = torch.round(-xmin / scale).clamp(0, maxq)
    else:
        raise ValueError(f"unknown quantizer convention {convention!r}")
    return AffineParams(scale, zero.clamp(0, maxq), maxq)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    # fp16 cannot hold values below ~6e-8; keep scales representable and nonzero.
    return x.clamp(min=6.2e-5, max=65504).half().float()


def quantize(w: torch.Tensor, p: AffineParams) -> torch.Tensor:
    """Integer codes (as float) of `w` under `p`: clamp(round(w / scale) + zero, 0, maxq)."""
    return torch.clamp(torch.round(w / p.scale) + p.zero, 0, p.maxq)


def dequantize(q: torch.Tensor, p: AffineParams) -> torch.Tensor:
    return p.scale * (q - p.zero)


def fake_quantize(w: torch.Tensor, p: AffineParams) -> torch.Tensor:
    """Quantize then dequantize (what the weight becomes)."""
    return dequantize(quantize(w, p), p)


def group_affine(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, convention: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole matrix (rows, cols) in groups of `group_size` columns (or per row when
    group_size <= 0 / == cols). Returns codes (rows, cols) uint8, scales (rows, n_groups) and zeros
    (rows, n_groups) as fp32."""
    rows, cols = w.shape
    g = cols if group_size <= 0 else group_size
    wg = w.float().reshape(rows * (cols // g), g)
    p = affine_params(wg, bits, sym, convention)
    q = quantize(wg, p).reshape(rows, cols).to(torch.uint8)
    return q, p.scale.reshape(rows, -1), p.zero.reshape(rows, -1)


class single_thread:
    """Run column-by-column loops on one thread: their ops are tiny, and with several threads on a busy
    machine OpenMP synchronisation dominates (measured: GPTQ on a 1536x576 layer 0.27 s on one thread,
    7.4 s on two with a loaded CPU)."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.n)
