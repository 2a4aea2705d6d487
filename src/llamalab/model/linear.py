"""The model's linear layer (the unit the Linear-swap seam replaces) and its inference-time fusion.

Every projection module tells the native decode step what it may read through `native_tensors(dtype)`:
the four tensors of a projection in `llamalab/kernels/projection.h`'s layout, or None when the step cannot
run it (a bias, another dtype, a forward that is not this one: LoRA, fake quantization, ...). Quantized
formats implement the same method (`llamalab.quant`), so the step needs to know no module class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamalab import kernels

EMPTY = torch.empty(0)  # an absent tensor of a projection (scales, zeros, permutation of a dense weight)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read one input, as quantization needs to know them (GPTQ's true-sequential
    groups, AWQ's and SmoothQuant's scaling pairs). Names are relative to the block."""

    linears: tuple[str, ...]
    input_op: str  # the module whose output is the group's input (a norm, or a linear whose rows feed it)
    inspect: str  # the smallest module whose output holds the group's whole effect (AWQ measures loss there)


class Linear(nn.Linear):
    """`nn.Linear` with a faster path for a single row (batch-1 decode).

    On CPU, `torch.mv` reads a row-major fp32 weight at close to memory bandwidth, where the (1, d) x (d, n)
    matmul that `F.linear` dispatches to is up to 2x slower (measured in BENCHMARKS.md). For bf16 weights
    torch.mv is slower still, so a native kernel (`llamalab.kernels`, where the CPU has AVX512-BF16) runs
    those; it builds no autograd graph, hence only when no gradient can flow to the weight.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and not x.requires_grad and x.device.type == "cpu":
            w, v = self.weight, x.reshape(-1)
            native = (
                w.dtype == x.dtype == torch.bfloat16
                and w.is_contiguous()
                and not (w.requires_grad and torch.is_grad_enabled())
            )
            gemv = kernels.gemv_bf16() if native else None
            y = torch.mv(w, v) if gemv is None else gemv(w, v)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

    def native_tensors(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """The weight as the native step reads a dense projection, or None where it cannot run this module
        (a subclass that computes something else, a bias, another dtype or device)."""
        w = self.weight
        if type(self).forward is not Linear.forward or self.bias is not None:
            return None
        if w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous():
            return None
        return [w, EMPTY, EMPTY, EMPTY]


class FusedLinear(Linear):
    """Linear layers that read the same input (q/k/v, gate/up) as one registered weight, for inference.

    The parent module owns it under one name (`qkv_proj`, `gate_up_proj`) in place of the parts, so there is
    exactly one copy of each weight, registered (it follows `.to()`, and nothing holds a stale copy).
    `parts()` gives back independent `Linear` modules with the same values (`unfuse`).
    """

    def __init__(self, parts: dict[str, Linear]) -> None:
        first = next(iter(parts.values()))
        sizes = [m.out_features for m in parts.values()]
        has_bias = first.bias is not None
        super().__init__(first.in_features, sum(sizes), bias=has_bias, device="meta")
        self.names, self.sizes = tuple(parts), sizes
        trainable = first.weight.requires_grad
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([m.weight for m in parts.values()]), trainable)
            if has_bias:
                self.bias = nn.Parameter(torch.cat([m.bias for m in parts.values()]), trainable)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts' outputs from the fused output `y` (views)."""
        return y.split(self.sizes, dim=-1)

    def parts(self) -> dict[str, Linear]:
        """Independent Linear modules with the parts' weights (copies: the fused tensor can then be freed)."""
        out = {}
        weights = self.weight.detach().split(self.sizes)
        biases = self.bias.detach().split(self.sizes) if self.bias is not None else [None] * len(self.sizes)
        for name, w, b in zip(self.names, weights, biases):
            m = Linear(self.in_features, w.shape[0], bias=b is not None, device="meta")
            m.weight = nn.Parameter(w.clone(), self.weight.requires_grad)
            if b is not None:
                m.bias = nn.Parameter(b.clone(), self.weight.requires_grad)
            out[name] = m
        return out

    def native_parts(self, dtype: torch.dtype) -> list[list[torch.Tensor]] | None:
        """Each part's tensors for the native step (row blocks of the fused weight, no copy)."""
        if self.native_tensors(dtype) is None:
            return None
        return [[w, EMPTY, EMPTY, EMPTY] for w in self.weight.split(self.sizes)]


def native_tensors(module: nn.Module, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """`module.native_tensors(dtype)` for modules that implement it (Linear, quantized formats), else None."""
    fn = getattr(module, "native_tensors", None)
    return fn(dtype) if fn is not None else None


def can_fuse(modules: list[nn.Module]) -> bool:
    """Only plain Linear weights of one dtype and device can be concatenated; swapped (quantized, LoRA)
    modules run one by one."""
    return (
        all(type(m) is Linear for m in modules)
        and len({(m.weight.dtype, m.weight.device, m.bias is None) for m in modules}) == 1
    )


class Fusable(nn.Module):
    """A module whose Linear parts that read one input can run fused at inference (Attention, MLP).

    `fusion` names the fused module and its parts, e.g. {"qkv_proj": ("q_proj", "k_proj", "v_proj")}.
    `fuse()` replaces the parts by one `FusedLinear`; `unfuse()` restores them (the Linear-swap seam calls
    it before replacing a part, see `llamalab.model.modules`). The state dict always uses the parts' HF
    names, fused or not.
    """

    fusion: dict[str, tuple[str, ...]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_split_fused_state)
        self.register_load_state_dict_pre_hook(_join_fused_state)

    @property
    def fused_parts(self) -> tuple[str, ...]:
        """Names of parts now held inside a fused module."""
        return tuple(p for name, parts in self.fusion.items() if self._modules.get(name) for p in parts)

    def fuse(self) -> None:
        for name, part_names in self.fusion.items():
            parts = {p: self._modules.get(p) for p in part_names}
            if self._modules.get(name) is None and can_fuse(list(parts.values())):
                _replace(self._modules, part_names, {name: FusedLinear(parts)})

    def unfuse(self) -> None:
        for name in self.fusion:
            fused = self._modules.get(name)
            if fused is not None:
                _replace(self._modules, (name,), fused.parts())

    def run(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of the parts of `fusion[name]` on `x`: one matmul when fused."""
        fused = self._modules.get(name)
        if fused is not None:
            return fused.split(fused(x))
        return tuple(self._modules[p](x) for p in self.fusion[name])


def _replace(modules: dict[str, nn.Module | None], old: tuple[str, ...], new: dict[str, nn.Module]) -> None:
    """Replace the entries `old` of a module's children by `new`, where the first of `old` stood (the
    order of children is the order of parameters, state dicts and optimizer groups)."""
    items = list(modules.items())
    at = next(i for i, (k, _) in enumerate(items) if k in old)
    items = (
        [kv for kv in items[:at] if kv[0] not in old]
        + list(new.items())
        + [kv for kv in items[at:] if kv[0] not in old]
    )
    modules.clear()
    modules.update(items)


def _split_fused_state(module: Fusable, state: dict, prefix: str, _local_metadata) -> None:
    for name in module.fusion:
        fused = module._modules.get(name)
        if fused is None:
            continue
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            if key in state:
                for p, t in zip(fused.names, state.pop(key).split(fused.sizes)):
                    state[f"{prefix}{p}.{kind}"] = t


def _join_fused_state(module: Fusable, state: dict, prefix: str, *_args) -> None:
    for name in module.fusion:
        fused = module._modules.get(name)
        if fused is None:
            continue
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{p}.{kind}" for p in fused.names]
            if all(k in state for k in keys):
                state[f"{prefix}{name}.{kind}"] = torch.cat([state.pop(k) for k in keys])
