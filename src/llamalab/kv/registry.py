"""The KV-cache registry: a method registers a factory under its name (the value of `--kv`), and every
command, the engine and the server build caches through `CacheSpec.make`.

A method lives in `llamalab/kv/<name>.py` and registers itself with `@register_kv_cache("<name>")`; the
module is imported the first time its name is asked for, so `llamalab --help` stays fast and a new method
needs no list to be edited. Tests and users may register methods from their own modules the same way.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.errors import LlamalabError

if TYPE_CHECKING:
    import torch

    from llamalab.kv.base import KVCache

# factory(spec, config, max_len, max_batch, dtype, device) -> KVCache
CacheFactory = Callable[["CacheSpec", Any, int, int, "torch.dtype", Any], "KVCache"]
_FACTORIES: dict[str, CacheFactory] = {}
_NOT_METHODS = {"base", "registry", "cli", "calibration"}  # and packages (`parts/`: pieces methods share)


def register_kv_cache(name: str) -> Callable[[CacheFactory], CacheFactory]:
    """Register a KV-cache factory under `name`."""

    def wrap(fn: CacheFactory) -> CacheFactory:
        _FACTORIES[name] = fn
        return fn

    return wrap


def kv_cache_names() -> list[str]:
    """Registered KV-cache methods plus those `llamalab/kv/` holds but has not imported yet."""
    found = {m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.ispkg}
    found -= _NOT_METHODS
    return sorted(set(_FACTORIES) | found)


def cache_factory(name: str) -> CacheFactory:
    """The factory of method `name`, importing `llamalab.kv.<name>` if it has not registered yet."""
    if name not in _FACTORIES and name.isidentifier() and name not in _NOT_METHODS:
        try:
            importlib.import_module(f"llamalab.kv.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"llamalab.kv.{name}":  # a missing dependency inside the method is a real error
                raise
    if name not in _FACTORIES:
        raise LlamalabError(f"unknown --kv {name!r}; known: {', '.join(kv_cache_names())}")
    return _FACTORIES[name]


@dataclass
class CacheSpec:
    """Which KV cache to build and its settings (`--kv`, `--kv-bits`, `--kv-group-size`, `--kv-arg`,
    `--kv-predictors`: a file of fitted parameters, such as AQUA-KV's predictors)."""

    method: str = "dense"
    bits: float | None = None  # bits per value; fractional for vector quantizers (AQUA-KV at 2.5 bits)
    group_size: int | None = None
    args: dict[str, str] = field(default_factory=dict)
    predictors: str | None = None

    @classmethod
    def of(cls, value: CacheSpec | str | None) -> CacheSpec:
        """A spec from a spec, a method name, or None (dense)."""
        if isinstance(value, CacheSpec):
            return value
        return cls(value or "dense")

    def check(self) -> CacheSpec:
        """Fail now, before any work, on an unknown method."""
        cache_factory(self.method)
        return self

    def make(self, config, max_len: int, max_batch: int, dtype, device) -> KVCache:
        """A fresh cache for `max_batch` sequences of up to `max_len` tokens of a model with `config`."""
        return cache_factory(self.method)(self, config, max_len, max_batch, dtype, device)

    def refuse_settings(self, accepted: tuple[str, ...] = ()) -> None:
        """For a factory: refuse the settings its method does not take, naming them."""
        given = {"bits": self.bits, "group_size": self.group_size, "predictors": self.predictors}
        extra = [
            f"--kv-{k.replace('_', '-')}" for k, v in given.items() if v is not None and k not in accepted
        ]
        extra += [f"--kv-arg {k}" for k in self.args if k not in accepted]
        if extra:
            raise LlamalabError(f"{', '.join(extra)} do(es) not apply to --kv {self.method}")
