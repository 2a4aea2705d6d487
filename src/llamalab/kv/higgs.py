"""`--kv higgs`: AQUA-KV's cache without predictors, every layer's keys and values quantized directly with
HIGGS (the paper's ablation of the predictors). Its own module so that the registry finds the name by its
file, as it finds every method."""

from __future__ import annotations

from llamalab.kv.aquakv import SETTINGS, AquaKVCache, build
from llamalab.kv.registry import CacheSpec, register_kv_cache


@register_kv_cache("higgs")
def higgs_cache(spec: CacheSpec, config, max_len: int, max_batch: int, dtype, device) -> AquaKVCache:
    """Every layer's K/V quantized with HIGGS, no inter-layer predictors."""
    spec.refuse_settings(accepted=SETTINGS)
    return build(spec, config, max_len, max_batch, dtype, device, None)
