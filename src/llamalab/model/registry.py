"""The architecture registry: an HF `architectures` name (or a GGUF `general.architecture`) maps to the
config class that reads it and the model class that runs it.

LLaMA (`LlamaForCausalLM`) registers itself in `llamalab.model.transformer`; other architectures (a
diffusion LM, a hybrid stack, a memory-augmented model) register theirs the same way, so that loading,
building, quantization, the engine and the server take them without a special case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from llamalab.errors import CheckpointError


@dataclass(frozen=True)
class Architecture:
    name: str  # the HF `architectures` entry, e.g. "LlamaForCausalLM"
    config: type  # has from_hf(raw, source) (and from_gguf(meta, source) when `gguf` names it)
    model: Callable[[Any], nn.Module]  # config -> model
    model_types: tuple[str, ...] = ()  # HF `model_type`s it reads when a config.json names no architecture
    gguf: tuple[str, ...] = ()  # GGUF `general.architecture` values it reads


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    _ARCHITECTURES[arch.name] = arch
    return arch


def architecture(name: str) -> Architecture:
    if name not in _ARCHITECTURES:
        raise CheckpointError(f"architecture {name!r} is not supported; known: {', '.join(_ARCHITECTURES)}")
    return _ARCHITECTURES[name]


def config_from_hf(raw: dict[str, Any], source: str = "config.json"):
    """The config of a parsed HF `config.json`, read by the class its architecture registered."""
    for name in raw.get("architectures") or []:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name].config.from_hf(raw, source=source)
    model_type = raw.get("model_type")
    if not raw.get("architectures"):
        for arch in _ARCHITECTURES.values():
            if model_type in arch.model_types:
                return arch.config.from_hf({**raw, "architectures": [arch.name]}, source=source)
    what = (raw.get("architectures") or [model_type])[0]
    raise CheckpointError(
        f"{source}: architecture {what!r} is not supported; llamalab loads {', '.join(_ARCHITECTURES)}"
    )


def config_from_gguf(meta: dict[str, Any], source: str = "gguf"):
    """The config of a GGUF file's metadata, read by the class its `general.architecture` registered."""
    name = meta.get("general.architecture")
    for arch in _ARCHITECTURES.values():
        if name in arch.gguf:
            return arch.config.from_gguf(meta, source=source)
    known = sorted(g for a in _ARCHITECTURES.values() for g in a.gguf)
    raise CheckpointError(
        f"{source}: architecture {name!r} is not supported; llamalab loads {', '.join(map(repr, known))} GGUF files"
    )


def create_model(config) -> nn.Module:
    """An (uninitialised) model for `config`, of the class its architecture registered."""
    return architecture(config.architecture).model(config)
