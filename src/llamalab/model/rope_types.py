"""transformers' RoPE-scaling family, op for op as in `transformers/modeling_rope_utils.py` (5.x):

- `linear`: Position Interpolation (Chen et al., arXiv 2306.15595; kaiokendev): every frequency / factor.
- `dynamic`: dynamic NTK (bloc97, emozilla): theta' = theta * (s*L/L0 - (s-1))^(d/(d-2)) at length L >= L0.
- `yarn`: YaRN (Peng et al., arXiv 2309.00071): high frequencies kept, low ones interpolated by the factor, a
  linear ramp between the pairs whose wavelengths fit beta_fast / beta_slow times in L0 (floor/ceil unless
  `truncate` is false, clamped, +0.001 against a zero-width ramp); attention factor 0.1 ln s + 1, or DeepSeek's
  mscale / mscale_all_dim ratio, or the given `attention_factor`.
- `longrope`: LongRoPE / LongRoPE2 / Phi-3 (arXiv 2402.13753, 2502.20082): one searched factor per frequency
  pair, `long_factor` for sequences longer than L0 and `short_factor` otherwise; attention factor
  sqrt(1 + ln s / ln L0), applied in both regimes (as transformers does).
- `llama3`: Llama 3.1: high frequencies kept, low ones / factor, a smooth blend between.
- `freq_factors`: llama.cpp's `rope_freqs` tensor (one divisor per frequency), how GGUF files carry llama3.

The original (pretraining) length L0 of each type, made explicit: in our `rope_scaling` dict it is always
`original_max_position_embeddings` and `max_position_embeddings` is the extended context. transformers reads it
differently per type, so `from_hf` / `to_hf` translate: `dynamic` uses the config's `max_position_embeddings`
as L0 (its `original_max_position_embeddings` is ignored), `yarn`/`longrope`/`llama3` read the key (a top-level
`original_max_position_embeddings`, Phi-3 style, wins; absent, `max_position_embeddings`), `linear` has none.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llamalab.model.rope import base_inv_freq, register_rope_scaling

ORIGINAL = "original_max_position_embeddings"
# Types whose L0 transformers reads from the scaling dict (the others: dynamic from max_position_embeddings).
_L0_IN_DICT = ("yarn", "longrope", "llama3")
# Keys transformers' validator knows per type (others make it warn), for what `to_hf` writes.
HF_KEYS = {
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {
        "factor",
        ORIGINAL,
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "longrope": {"short_factor", "long_factor", ORIGINAL, "attention_factor", "factor"},
    "llama3": {"factor", ORIGINAL, "low_freq_factor", "high_freq_factor"},
}


def _original(scaling: dict[str, Any], config: Any) -> int:
    return int(scaling.get(ORIGINAL) or config.max_position_embeddings)


@register_rope_scaling("linear")
def _linear(inv_freq: torch.Tensor, scaling: dict[str, Any], config: Any) -> tuple[torch.Tensor, float]:
    # Position Interpolation: positions divided by `factor` == frequencies divided.
    return inv_freq / float(scaling["factor"]), 1.0


@register_rope_scaling("dynamic", length_dependent=True)
def _dynamic(inv_freq, scaling, config, seq_len: int) -> tuple[torch.Tensor, float]:
    # The base grows with the length once it passes L0; below L0 it is the plain RoPE.
    factor, original, d = float(scaling["factor"]), _original(scaling, config), config.head_dim
    if seq_len <= original:
        return inv_freq, 1.0
    # fp32 tensor arithmetic, as transformers does when it regrows the base from max(position_ids) + 1.
    grow = (factor * torch.tensor(seq_len) / original - (factor - 1)) ** (d / (d - 2))
    base = config.rope_theta * grow
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0


def yarn_ramp(
    head_dim: int, theta: float, original: int, beta_fast: float, beta_slow: float, truncate: bool = True
) -> torch.Tensor:
    """YaRN's interpolation weight per pair (0 = keep the frequency, 1 = divide it by the factor)."""

    def correction_dim(rotations: float) -> float:  # the pair whose wavelength fits `rotations` times in L0
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    return torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@register_rope_scaling("yarn")
def _yarn(inv_freq, scaling, config) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # DeepSeek's ratio
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    d, theta = config.head_dim, config.rope_theta
    pos_freqs = theta ** (torch.arange(0, d, 2).float() / d)  # transformers computes this one this way
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = yarn_ramp(
        d,
        theta,
        _original(scaling, config),
        scaling.get("beta_fast") or 32,
        scaling.get("beta_slow") or 1,
        scaling.get("truncate", True),
    )
    keep = 1 - ramp  # transformers' "extrapolation factor"
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def longrope_attention_factor(scaling: dict[str, Any], config: Any) -> float:
    """The given `attention_factor`, else LongRoPE's "su" scale sqrt(1 + ln s / ln L0) (1 for s <= 1)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = _original(scaling, config)
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


@register_rope_scaling(
    "longrope",
    required=("short_factor", "long_factor"),
    length_dependent=True,
    factor_lists=("short_factor", "long_factor"),
)
def _longrope(inv_freq, scaling, config, seq_len: int) -> tuple[torch.Tensor, float]:
    # One rescale factor per pair: theta^(2i/d) * factor_i; the long set only beyond L0.
    key = "long_factor" if seq_len > _original(scaling, config) else "short_factor"
    ext = torch.tensor(scaling[key], dtype=torch.float32)
    shape = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    return 1.0 / (ext * config.rope_theta**shape), longrope_attention_factor(scaling, config)


@register_rope_scaling("llama3", required=("factor", "low_freq_factor", "high_freq_factor"))
def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any], config: Any) -> tuple[torch.Tensor, float]:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = float(scaling["factor"])
    low_ff, high_ff = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling.get(ORIGINAL) or (config.max_position_embeddings if config else 8192))
    low_freq_wavelen = old_ctx / low_ff
    high_freq_wavelen = old_ctx / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


@register_rope_scaling("freq_factors", required=("factors",))
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
            ORIGINAL: original,
        }
        scaled, _ = _llama3(inv_freq, candidate, None)
        if torch.allclose(scaled, inv_freq / factors_t, rtol=1e-4, atol=0):
            return candidate
    return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}


# --- transformers' config semantics <-> ours -------------------------------------------------------------


def from_hf_scaling(
    scaling: dict[str, Any], max_pos: int, top_level_original: int | None
) -> tuple[dict[str, Any], int]:
    """(our scaling dict, our context) for an HF config's scaling dict and `max_position_embeddings`: L0 is
    made explicit and the context is what the setting supports (see the module docstring)."""
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type")
    if rope_type == "dynamic":
        # transformers' dynamic NTK treats max_position_embeddings as L0 and has no upper length.
        scaling[ORIGINAL] = max_pos
        factor = scaling.get("factor")
        return scaling, int(round(max_pos * factor)) if isinstance(factor, (int, float)) else max_pos
    if rope_type in _L0_IN_DICT:
        scaling[ORIGINAL] = int(top_level_original or scaling.get(ORIGINAL) or max_pos)
        if rope_type == "longrope" and scaling.get("factor") is None:
            scaling["factor"] = max_pos / scaling[ORIGINAL]  # what transformers derives, fixed here
        factor = scaling.get("factor")
        if isinstance(factor, (int, float)):
            return scaling, max(max_pos, int(round(scaling[ORIGINAL] * factor)))
    return scaling, max_pos


def to_hf_scaling(scaling: dict[str, Any], context: int) -> tuple[dict[str, Any], int]:
    """(transformers' scaling dict, its max_position_embeddings) for our scaling dict and context, so that
    transformers computes the same frequencies."""
    rope_type = scaling.get("rope_type")
    keys = HF_KEYS.get(rope_type)
    out = {"rope_type": rope_type, **{k: v for k, v in scaling.items() if keys is None or k in keys}}
    if rope_type == "dynamic":
        return out, int(scaling.get(ORIGINAL) or context)
    return out, context
