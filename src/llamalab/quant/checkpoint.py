"""Quantized checkpoints: write a directory every command loads, and the loader hook that reads it back.

A quantized model directory is an ordinary HF-style directory (`model.safetensors`, `config.json`,
tokenizer files, `generation_config.json`) written atomically by `llamalab.io.hf.write_hf_dir`. The packed
tensors are the modules' portable buffers (`qweight`, `scales` in fp16, `qzeros`, masks, ...); the tensors
left unquantized (embedding, tied head, norms, linears of blocks not quantized) are stored in bf16 unless the
caller asks for another dtype: in fp32 they would be most of a small 4-bit directory (SmolLM2-135M's
embedding alone is 28M of its 135M weights). Loading casts them to the dtype asked for (fp32 upcasts).
`config.json` carries

    "quantization_config": {"quant_method": "llamalab", "method": "gptq", "bits": 4, "group_size": 64,
        ...every method setting..., "calibration": {"source", "nsamples", "seq_len", "seed", "tokens"},
        "versions": {"llamalab", "torch", "python", ...}, "bits_per_weight": ..., "modules": {
        "model.layers.0.self_attn.q_proj": {"format": "uniform", "bits": 4, "group_size": 64, ...}, ...}}

On load, `llamalab.model.build.build_model` runs the load hook `apply_quantization_config` (registered here)
before the weights are assigned: it swaps each listed `Linear` for an empty module of the stored format, so
the ordinary state-dict assignment fills the packed buffers, and each module then converts itself to its
kernel layout (`prepare`). Nothing is re-quantized.
"""

from __future__ import annotations

import importlib
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.errors import CheckpointError, LlamalabError
from llamalab.io.hf import write_hf_dir
from llamalab.model.build import parse_dtype, register_load_hook
from llamalab.model.modules import set_module
from llamalab.quant.base import FORMAT_MODULES, FORMATS, QuantLinear

QUANT_METHOD = "llamalab"


def versions() -> dict[str, str]:
    import gguf  # noqa: F401  (version of the package that writes our GGUF exports)
    import numpy
    import safetensors

    from llamalab.version import __version__

    out = {
        "llamalab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        out["gguf"] = version("gguf")
    except Exception:  # not installed as a distribution; the version is informative only
        pass
    return out


def quantization_config(model: nn.Module, report) -> dict[str, Any]:
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            modules[name] = {"format": m.format, **m.spec()}
    return {
        "quant_method": QUANT_METHOD,
        "method": report.method,
        **report.settings,
        "calibration": report.calibration,
        "bits_per_weight": round(report.bits_per_weight, 4),
        "quantize_seconds": round(report.seconds, 1),
        "versions": versions(),
        "modules": modules,
    }


def save_quantized(llm, report, out: str | Path, dtype: str = "bf16") -> Path:
    """Write the (in-place quantized) `llm` to a new directory `out`, atomically; the tensors that are not
    quantized are stored in `dtype` (bf16 by default, "fp32" to keep them exactly as calibrated)."""
    model = llm.model
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qmods:
        raise LlamalabError("the model has no quantized modules; run quantize_model first")
    store = parse_dtype(dtype)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in qmods:
            m = qmods[owner]
            if getattr(m, "kernel", None) not in (None, "native"):  # "native" reads the portable layout
                raise LlamalabError(f"{owner} was converted to a kernel layout; save before prepare_model()")
            state[name] = t.half() if name.rpartition(".")[2] in m.fp16_buffers else t
        else:
            state[name] = t.to(store) if t.is_floating_point() else t
    if llm.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = llm.config.to_hf()
    config["torch_dtype"] = config["dtype"] = str(store).replace("torch.", "")
    config["quantization_config"] = quantization_config(model, report)
    generation = dict(llm.checkpoint.generation)
    generation["eos_token_id"] = llm.eos_token_ids
    write_hf_dir(Path(out), config, state, llm.tokenizer, generation)
    return Path(out)


@register_load_hook
def apply_quantization_config(
    model: nn.Module, raw_config: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Load hook: swap the Linear modules that config.json's `quantization_config` lists for empty modules
    of their stored formats (nothing for an unquantized checkpoint)."""
    qcfg = raw_config.get("quantization_config")
    if not qcfg:
        return
    method = qcfg.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{source}: quantization_config has quant_method {method!r}; llamalab loads its own quantized "
            f"directories (quant_method {QUANT_METHOD!r}) and unquantized checkpoints"
        )
    modules = qcfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{source}: quantization_config has no 'modules' table")
    for name, spec in modules.items():
        spec = dict(spec)
        fmt = spec.pop("format", None)
        cls = format_class(fmt, source)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{source}: quantized module {name!r} does not exist in this model"
            ) from None
        with torch.device("meta"):
            try:
                new = cls.empty(old.in_features, old.out_features, old.bias is not None, **spec)
            except (TypeError, LlamalabError) as e:
                raise CheckpointError(f"{source}: bad quantization spec for {name}: {e}") from None
        set_module(model, name, new)


def format_class(fmt: str | None, source: str = "checkpoint") -> type[QuantLinear]:
    if fmt not in FORMAT_MODULES:
        raise CheckpointError(
            f"{source}: unknown quantized format {fmt!r} (known: {', '.join(FORMAT_MODULES)})"
        )
    importlib.import_module(FORMAT_MODULES[fmt])
    return FORMATS[fmt]


def prepare_model(model: nn.Module) -> nn.Module:
    """Convert every quantized module to its fast kernel layout (after saving, for this process's use)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    return model
