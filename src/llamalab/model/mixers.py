"""Layer types: which token mixer each block runs (attention, or another kind in a hybrid stack).

`config.layer_types[i]` names layer i's mixer. A mixer is a module built as `cls(config, layer_idx)` and
called as `mixer(x, ctx)` with the pass's `AttnContext` (positions, cache rows and starts, masks); it sits
in its block under `cls.attribute` (`self_attn` for attention, HF's name). A mixer that is not attention
keeps its per-sequence state in `ctx.cache.state(layer_idx)` (a sequence starting at position 0 begins a
fresh state), declares its linears through `linear_groups(input_op)` so quantization calibrates them, and
is run by the PyTorch path (the native decode step takes attention-only stacks).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from llamalab.errors import CheckpointError
from llamalab.model.attention import Attention

_MIXERS: dict[str, type[nn.Module]] = {"attention": Attention}


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a mixer class for layer type `name`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        _MIXERS[name] = cls
        return cls

    return wrap


def create_mixer(config, layer_idx: int) -> nn.Module:
    kind = config.layer_types[layer_idx]
    if kind not in _MIXERS:
        raise CheckpointError(f"layer {layer_idx} has type {kind!r}; known layer types: {', '.join(_MIXERS)}")
    return _MIXERS[kind](config, layer_idx)
