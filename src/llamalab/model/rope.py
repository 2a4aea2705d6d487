"""Rotary position embedding (RoPE) and the RoPE-scaling seam.

`rope_frequencies(config)` is the one place that turns a `rope_scaling` dict into inverse frequencies and an
attention factor (the multiplier on cos/sin that YaRN-style methods use). Scaling methods register a
function under their HF `rope_type` name with `@register_rope_scaling`; context-extension work adds its
methods there and every model, eval and server path picks them up.

Layout is transformers' "rotate half" (the first and second halves of each head are the pair), so HF
safetensors load without permutation; GGUF's interleaved pairs are un-permuted at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# name -> fn(inv_freq, scaling_dict, config) -> (inv_freq, attention_factor)
RopeScaler = Callable[[torch.Tensor, dict[str, Any], Any], tuple[torch.Tensor, float]]
_SCALERS: dict[str, RopeScaler] = {}


def register_rope_scaling(name: str) -> Callable[[RopeScaler], RopeScaler]:
    """Register a RoPE scaling function under the HF `rope_type` name `name`."""

    def wrap(fn: RopeScaler) -> RopeScaler:
        _SCALERS[name] = fn
        return fn

    return wrap


def rope_scaling_types() -> list[str]:
    """The `rope_type` names this installation understands."""
    return sorted(["default", *_SCALERS])


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE inverse frequencies theta^(-2i/d), computed exactly as transformers does (fp32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponents)


def rope_frequencies(config: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and attention factor for `config`'s RoPE and scaling."""
    inv_freq = base_inv_freq(config.head_dim, config.rope_theta)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type not in _SCALERS:
        from llamalab.errors import CheckpointError

        raise CheckpointError(
            f"rope_scaling type {rope_type!r} is not supported; known types: {', '.join(rope_scaling_types())}"
        )
    return _SCALERS[rope_type](inv_freq, scaling, config)


@register_rope_scaling("linear")
def _linear(inv_freq: torch.Tensor, scaling: dict[str, Any], config: Any) -> tuple[torch.Tensor, float]:
    # Position Interpolation (Chen et al. 2023): positions divided by `factor` == frequencies divided.
    return inv_freq / float(scaling["factor"]), 1.0


@register_rope_scaling("llama3")
def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any], config: Any) -> tuple[torch.Tensor, float]:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = float(scaling["factor"])
    low_ff = float(scaling.get("low_freq_factor", 1.0))
    high_ff = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_ctx / low_ff
    high_freq_wavelen = old_ctx / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


@register_rope_scaling("freq_factors")
def _freq_factors(inv_freq: torch.Tensor, scaling: dict[str, Any], config: Any) -> tuple[torch.Tensor, float]:
    # llama.cpp's `rope_freqs` tensor: one divisor per frequency (how GGUF files carry Llama 3.1 scaling).
    return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device=inv_freq.device), 1.0


def llama3_scaling_from_factors(factors: list[float], head_dim: int, theta: float) -> dict[str, Any]:
    """The `rope_scaling` dict for a GGUF `rope_freqs` tensor: Llama 3.1's `llama3` parameters when they
    reproduce the factors (so the model converts back to an HF config), else the raw factors."""
    factors_t = torch.tensor(factors, dtype=torch.float32)
    inv_freq = base_inv_freq(head_dim, theta)
    for original in (8192, 4096, 2048):
        candidate = {
            "rope_type": "llama3",
            "factor": float(factors_t.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
        scaled, _ = _llama3(inv_freq, candidate, None)
        if torch.allclose(scaled, inv_freq / factors_t, rtol=1e-4, atol=0):
            return candidate
    return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` (B, T) -> each (B, T, head_dim), in fp32 then cast to `dtype`."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by cos/sin (B, T, D) in the rotate-half layout."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
