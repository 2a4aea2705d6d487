"""The Linear-swap seam's helpers: find and replace a module by its Hugging Face name.

Quantization, LoRA and other methods replace `Linear` modules by name (`model.layers.3.self_attn.q_proj`).
A loaded model runs q/k/v and gate/up fused for inference (`Transformer.fuse()`); a fused parent is unfused
the first time one of its parts is asked for, so the seam always sees the HF modules.
"""

from __future__ import annotations

from torch import nn


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child in getattr(parent, "fused_parts", ()):
        parent.unfuse()
    return parent, child


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` (unfusing its parent first when `name` is a fused part)."""
    parent, child = _parent(model, name)
    return parent.get_submodule(child)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module called `name` with `new`."""
    parent, child = _parent(model, name)
    setattr(parent, child, new)
