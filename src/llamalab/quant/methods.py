"""The method registry and the driver that quantizes a model with any registered method.

A method is a class in its own file (`rtn.py`, `gptq.py`, ...) registered with `@register_method`. It
declares what its calibration needs (`kinds`: Hessian, mean |x|, max |x|, raw inputs), whether the next
block sees quantized or float outputs (`propagate`, per its reference code), its bit range and defaults,
and turns one `Linear` (plus its Stats) into a `QuantLinear`, or processes a whole block when its search
spans several linears (AWQ, SmoothQuant).
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.model.modules import set_module
from llamalab.quant.base import INT4_KERNEL_GROUPS, QuantLinear
from llamalab.quant.calib import (
    BlockContext,
    CalibConfig,
    Stats,
    calibration_ids,
    capture,
    run_layerwise,
)

METHODS: dict[str, type[Method]] = {}
# name -> module, imported on first use so `llamalab --help` stays fast
METHOD_MODULES = {
    "rtn": "llamalab.quant.rtn",
    "gptq": "llamalab.quant.gptq",
    "awq": "llamalab.quant.awq",
    "nf4": "llamalab.quant.nf4",
    "smoothquant": "llamalab.quant.smoothquant",
    "quip": "llamalab.quant.quip",
    "pbllm": "llamalab.quant.pbllm",
    "billm": "llamalab.quant.billm",
    "slimllm": "llamalab.quant.slimllm",
    "dbllm": "llamalab.quant.dbllm",
}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in METHOD_MODULES:
        raise LlamalabError(f"unknown quantization method {name!r}; known: {', '.join(METHOD_MODULES)}")
    importlib.import_module(METHOD_MODULES[key])
    return METHODS[key]


class Method:
    """Base class of a quantization method (see module docstring)."""

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = True
    kinds: ClassVar[set[str]] = {"hessian"}
    propagate: ClassVar[str] = "quantized"
    bit_range: ClassVar[tuple[float, float]] = (2, 8)
    default_bits: ClassVar[float] = 4
    default_group_size: ClassVar[int] = -1
    group_sizes_allowed: ClassVar[bool] = True
    ragged_groups: ClassVar[bool] = False  # the reference allows a shorter last group (PB-LLM, BiLLM)
    default_calib: ClassVar[dict[str, Any]] = {}
    seeded: ClassVar[bool] = False  # random transforms seeded by the option `seed`, else the calibration's
    # Raised when a fix changes what the method computes: lab cells and artifacts made before are not reused.
    revision: ClassVar[int] = 1

    def __init__(self, bits: float, group_size: int, **options: Any) -> None:
        lo, hi = self.bit_range
        if not lo <= bits <= hi:
            raise LlamalabError(
                f"{self.name}: --bits {bits:g} is out of range; this method takes {lo:g} to {hi:g}"
            )
        if group_size == 0 or group_size < -1:
            raise LlamalabError(
                f"--group-size must be a positive number of columns or -1 (per channel), got {group_size}"
            )
        if group_size > 0 and not self.group_sizes_allowed:
            raise LlamalabError(f"{self.name} does not use groups; leave --group-size at -1")
        if group_size > 0 and group_size < 8:
            raise LlamalabError(f"--group-size {group_size} is too small; use at least 8 columns (or -1)")
        self.bits = int(bits) if float(bits).is_integer() else bits
        self.group_size = group_size
        self.options = self.check_options(options)
        self.layer_log: dict[str, dict[str, float]] = {}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if options:
            raise LlamalabError(f"{self.name}: unknown option(s) {', '.join(sorted(options))}")
        return {}

    def settings(self) -> dict[str, Any]:
        """Every setting, for the checkpoint's quantization config."""
        return {"bits": self.bits, "group_size": self.group_size, **self.options}

    # --- per linear / per block --------------------------------------------------------------------------
    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats | None) -> QuantLinear:
        raise NotImplementedError

    def process_block(
        self,
        i: int,
        block: nn.Module,
        x: torch.Tensor,
        fp_out: torch.Tensor,
        stats: dict[str, Stats],
        ctx: BlockContext,
    ) -> None:
        """Quantize every linear of block i. With `true_sequential`, inputs are re-captured after each of
        the block's linear groups ([q,k,v] -> [o] -> [gate,up] -> [down] for LLaMA) is quantized."""
        prefix = f"model.layers.{i}."
        if self.options.get("true_sequential"):
            for k, group in enumerate(block.linear_groups()):
                if k:
                    _, stats = capture(block, x, ctx, list(group.linears), self.kinds)
                for n in group.linears:
                    self._swap(block, prefix, n, stats[n])
        else:
            for n in block.linear_names():
                self._swap(block, prefix, n, stats[n])

    def _swap(self, block: nn.Module, prefix: str, name: str, stats: Stats | None) -> None:
        linear = block.get_submodule(name)
        q = self.quantize_linear(prefix + name, linear, stats)
        set_module(block, name, q)


@dataclass
class QuantReport:
    """What a quantization run did: settings, calibration, per-block errors, time, bits per weight."""

    method: str
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    blocks: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    quantized_modules: list[str] = field(default_factory=list)
    quantized_bytes: int = 0  # as stored (fp16 scales), see QuantLinear.storage_bytes
    quantized_params: int = 0
    layer_log: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)


def check_group_size(model: nn.Module, group_size: int, layers: list[int]) -> None:
    """Every quantized linear's input width must be a multiple of the group size."""
    if group_size <= 0:
        return
    widths = {}
    for i in layers:
        block = model.model.layers[i]
        for n in block.linear_names():
            widths.setdefault(block.get_submodule(n).in_features, f"model.layers.{i}.{n}")
    for width, name in sorted(widths.items()):
        if width % group_size:
            g = math.gcd(*widths)
            ok = [s for s in INT4_KERNEL_GROUPS if g % s == 0] or [g]
            raise LlamalabError(
                f"--group-size {group_size} does not divide the input width {width} of {name}; "
                f"use a divisor of {g} such as {ok[0]}, or -1 for per-channel"
            )


def quantize_model(
    llm,
    method: str,
    bits: float | None = None,
    group_size: int | None = None,
    calib: CalibConfig | None = None,
    layers: list[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> QuantReport:
    """Quantize `llm.model` in place with `method` and return a report. The swapped modules keep their
    portable layout (so the model can be saved); call `llamalab.quant.prepare_model` for kernel speed."""
    cls = get_method(method)
    bits = cls.default_bits if bits is None else bits
    group_size = cls.default_group_size if group_size is None else group_size
    if cls.seeded and calib is not None:  # one seed draws the calibration windows and the random transforms
        options.setdefault("seed", calib.seed)
    m = cls(bits, group_size, **options)
    model = llm.model
    model.unfuse()  # quantization replaces the HF modules one by one
    if any(isinstance(mod, QuantLinear) for mod in model.modules()):
        raise LlamalabError("this model is already quantized; load the original weights to quantize again")
    n_layers = len(model.model.layers)
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n_layers for i in layers):
        raise LlamalabError(f"layer indices must be in 0..{n_layers - 1}")
    if not cls.ragged_groups:
        check_group_size(model, m.group_size, layers)
    params_before = {
        f"model.layers.{i}.{n}": model.model.layers[i].get_submodule(n).weight.numel()
        for i in layers
        for n in model.model.layers[i].linear_names()
    }
    t0 = time.perf_counter()
    calib_info = None
    if cls.calibrated:
        calib = calib or CalibConfig(**{**CalibConfig().to_dict(), **cls.default_calib})
        ids = calibration_ids(llm.tokenizer, calib)
        calib_info = {**calib.to_dict(), "tokens": int(ids.numel())}
        blocks = run_layerwise(
            model, ids, m.process_block, m.kinds, m.propagate, layers, progress, desc=f"{m.name} w{m.bits}"
        )
    else:
        blocks = _uncalibrated(model, m, layers, progress)
    seconds = time.perf_counter() - t0
    names = list(params_before)
    dtype = model.model.embed_tokens.weight.dtype
    if dtype != torch.float32:  # quantized modules are built in fp32; compute in the model's dtype
        for n in names:
            model.get_submodule(n).to(dtype)
    qbytes = sum(model.get_submodule(n).storage_bytes for n in names)
    return QuantReport(
        method=m.name,
        settings=m.settings(),
        calibration=calib_info,
        blocks=blocks,
        seconds=seconds,
        quantized_modules=names,
        quantized_bytes=qbytes,
        quantized_params=sum(params_before.values()),
        layer_log=m.layer_log,
    )


@torch.no_grad()
def _uncalibrated(model: nn.Module, m: Method, layers: list[int], progress: bool) -> list[dict[str, float]]:
    from tqdm import tqdm

    records = []
    bar = tqdm(layers, desc=f"{m.name} w{m.bits}", unit="block", disable=not progress)
    for i in bar:
        block = model.model.layers[i]
        err_num = err_den = 0.0
        for n in block.linear_names():
            lin = block.get_submodule(n)
            q = m.quantize_linear(f"model.layers.{i}.{n}", lin, None)
            w = lin.weight.float()
            err_num += float((q.dequantize() - w).pow(2).sum())
            err_den += float(w.pow(2).sum())
            set_module(block, n, q)
        records.append({"block": i, "rel_weight_error": err_num / max(err_den, 1e-30)})
        bar.set_postfix(layer=i, rel_err=f"{records[-1]['rel_weight_error']:.2e}")
    return records
