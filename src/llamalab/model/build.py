"""Building a model from a config and HF-named weights, and the dtypes users name.

`build_model` makes the architecture's model on the meta device, lets the registered load hooks change its
modules before any weight is assigned (a quantized checkpoint swaps in its packed modules, so the weights
load as stored), checks names and shapes against the checkpoint, and assigns the tensors without a copy.
The result is a plain, training-ready model; `llamalab.load` then fuses projections for inference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llamalab.errors import CheckpointError, LlamalabError
from llamalab.model.modules import set_module
from llamalab.model.registry import create_model

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# hook(model on the meta device, config.json as read, source) -> None
LoadHook = Callable[[nn.Module, dict[str, Any], str], None]
_LOAD_HOOKS: list[LoadHook] = []


def register_load_hook(fn: LoadHook) -> LoadHook:
    """Register a function that adapts a freshly created model to its checkpoint before weights load."""
    _LOAD_HOOKS.append(fn)
    return fn


STORED = "stored"  # load()'s dtype that keeps a GGUF file's quantized blocks (llamalab.api.load)
AUTO = "auto"  # load()'s dtype: STORED where it applies and the native kernels run, else fp32


def check_dtype(dtype: str | torch.dtype) -> None:
    """Fail on a dtype `llamalab.api.load` does not take (it takes STORED and AUTO besides parse_dtype's)."""
    if dtype not in (STORED, AUTO):
        parse_dtype(dtype)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlamalabError(
            f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 (or stored / auto, for a GGUF file)"
        )
    return DTYPES[dtype]


def build_model(
    config,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "checkpoint",
    raw_config: dict[str, Any] | None = None,
    modules: dict[str, nn.Module] | None = None,
) -> nn.Module:
    """The model for `config` holding the HF-named `state_dict` (each weight once, as a parameter).
    `modules` (by name) take their places before the weights load and bring their own (a GGUF file's layers
    kept as stored, `Checkpoint.stored`); a head among them is not tied to the embedding as a parameter (a
    stored embedding may hold the same module)."""
    modules = modules or {}
    with torch.device("meta"):
        model = create_model(config)
    for hook in _LOAD_HOOKS:
        hook(model, raw_config or {}, source)
    for name, module in modules.items():
        set_module(model, name, module.to(device))
    tied = config.tie_word_embeddings and "lm_head" not in modules
    state = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied:
        state.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict().items() if not _held_by(k, modules)}
    if tied:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{source}: weights do not match the config ({what})")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(t.shape)}, config implies {tuple(expected[name].shape)}"
            )
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.refresh_rope()
    return model.eval()


def _held_by(key: str, modules: dict[str, nn.Module]) -> bool:
    """Whether state-dict entry `key` belongs to one of `modules` (or to a module inside one)."""
    return any(key.startswith(name + ".") for name in modules)
