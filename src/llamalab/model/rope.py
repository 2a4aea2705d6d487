"""Rotary position embedding (RoPE) and the RoPE-scaling seam.

`rope_frequencies(config, seq_len)` is the one place that turns a `rope_scaling` dict into inverse frequencies
and an attention factor (the multiplier on cos/sin that YaRN-style methods use). Scaling methods register a
function under their HF `rope_type` name with `@register_rope_scaling`, saying which keys they need and
whether they depend on the sequence length; `llamalab.model.rope_types` holds transformers' family (linear,
dynamic, yarn, longrope, llama3) and every model, eval and server path picks them up.

Length-dependent types (`dynamic`, `longrope`) get the length of the sequence they serve. transformers
recomputes them at every forward call from `max(position_ids) + 1`, so keys already in a KV cache keep an
older rotation (huggingface/transformers#25104; vLLM PR #27431, llama.cpp PR #24875 for longrope). We fix the
rotation per sequence instead: a pass without a cache uses `max(positions) + 1` (transformers' choice, so
logits match it exactly), a pass through a KV cache uses the length that cache was made for (the sequence's
budget: prompt + new tokens for `generate`, the context for a server), so chunked prefill and decoding never
mix two rotations.

Layout is transformers' "rotate half" (the first and second halves of each head are the pair), so HF
safetensors load without permutation; GGUF's interleaved pairs are un-permuted at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llamalab.errors import CheckpointError

# fn(inv_freq, scaling_dict, config[, seq_len]) -> (inv_freq, attention_factor)
RopeScaler = Callable[..., tuple[torch.Tensor, float]]


@dataclass(frozen=True)
class ScalingType:
    fn: RopeScaler
    required: tuple[str, ...]  # keys the rope_scaling dict must hold (besides rope_type)
    length_dependent: bool  # fn takes `seq_len` and its result changes with it
    factor_lists: tuple[str, ...] = ()  # keys holding one factor per frequency pair


_SCALERS: dict[str, ScalingType] = {}


def register_rope_scaling(
    name: str,
    *,
    required: tuple[str, ...] = ("factor",),
    length_dependent: bool = False,
    factor_lists: tuple[str, ...] = (),
) -> Callable[[RopeScaler], RopeScaler]:
    """Register a RoPE scaling function under the HF `rope_type` name `name`. `required` keys are checked
    (one clear error naming the missing ones) before the function runs; a `length_dependent` function also
    receives `seq_len`, the length of the sequence it serves."""

    def wrap(fn: RopeScaler) -> RopeScaler:
        _SCALERS[name] = ScalingType(fn, tuple(required), length_dependent, tuple(factor_lists))
        return fn

    return wrap


def rope_scaling_types() -> list[str]:
    """The `rope_type` names this installation understands."""
    return sorted(["default", *_SCALERS])


def scaling_type(name: str) -> ScalingType:
    if name not in _SCALERS:
        raise CheckpointError(
            f"rope_scaling type {name!r} is not supported; known types: {', '.join(rope_scaling_types())}"
        )
    return _SCALERS[name]


def is_length_dependent(scaling: dict[str, Any] | None) -> bool:
    """Whether this scaling's frequencies change with the sequence length (dynamic NTK, LongRoPE)."""
    if not scaling or scaling.get("rope_type", "default") == "default":
        return False
    return scaling_type(scaling["rope_type"]).length_dependent


def check_scaling(scaling: dict[str, Any], head_dim: int) -> None:
    """Raise one clear error for a scaling dict that cannot be used: an unknown type, a missing key, a factor
    below 1 or a per-pair factor list of the wrong length."""
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return
    kind = scaling_type(rope_type)
    missing = [k for k in kind.required if scaling.get(k) is None]
    if missing:
        raise CheckpointError(f"rope_scaling type {rope_type!r} needs {', '.join(missing)}; it is missing")
    factor = scaling.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
        raise CheckpointError(
            f"rope_scaling factor must be a number >= 1 (it is the context extension ratio), got {factor!r}"
        )
    for key in kind.factor_lists:
        values = scaling[key]
        if not isinstance(values, list) or len(values) != head_dim // 2:
            n = len(values) if isinstance(values, list) else type(values).__name__
            raise CheckpointError(
                f"rope_scaling {key} must list one factor per frequency pair ({head_dim // 2}), got {n}"
            )
        bad = [v for v in values if not isinstance(v, (int, float)) or not v > 0]
        if bad:
            raise CheckpointError(f"rope_scaling {key} holds a non-positive or non-numeric factor {bad[0]!r}")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and (not isinstance(original, int) or original < 1):
        raise CheckpointError(
            f"original_max_position_embeddings must be a positive integer, got {original!r}"
        )


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE inverse frequencies theta^(-2i/d), computed exactly as transformers does (fp32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponents)


def rope_frequencies(config: Any, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and attention factor for `config`'s RoPE and scaling, for a sequence
    of `seq_len` tokens (only length-dependent types read it; default: the model's context)."""
    inv_freq = base_inv_freq(config.head_dim, config.rope_theta)
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq, 1.0
    check_scaling(scaling, config.head_dim)
    kind = scaling_type(scaling["rope_type"])
    if kind.length_dependent:
        return kind.fn(inv_freq, scaling, config, seq_len=seq_len or config.max_position_embeddings)
    return kind.fn(inv_freq, scaling, config)


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


def critical_pair(head_dim: int, theta: float, train_len: int) -> int:
    """The first frequency pair whose wavelength 2*pi*theta^(2i/d) exceeds the training length (so it never
    saw a full period): ceil((d/2) * log_theta(L / 2pi)), the "theoretical critical dimension" / 2 of the
    RoPE-extrapolation scaling laws that LongRoPE2 (arXiv 2502.20082) starts from."""
    return math.ceil(head_dim / 2 * math.log(train_len / (2 * math.pi), theta))
