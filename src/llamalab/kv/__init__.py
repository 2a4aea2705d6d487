"""KV-cache methods behind one seam (`base.KVCache`), built through one registry (`registry`)."""

from llamalab.kv.base import KVCache
from llamalab.kv.registry import CacheSpec, kv_cache_names, register_kv_cache

__all__ = ["CacheSpec", "KVCache", "kv_cache_names", "register_kv_cache"]
