"""The output of a run: an HF directory (`model/`) that `llamalab generate`, `serve`, `eval` and transformers
load as they are (LoRA merged into the base, QLoRA's NF4 base dequantized), and for adapter runs the PEFT
files (`adapter/adapter_model.safetensors`, `adapter_config.json`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from llamalab.io.hf import write_hf_dir


def export_run(model, built, cfg, run_dir: Path) -> Path:
    """Write `run_dir/model` (and `run_dir/adapter`) from the trained `model` (the unwrapped Transformer)."""
    from llamalab.train.lora import LoRALinear, adapter_config, adapter_state, merge_lora

    has_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    if has_lora:
        from safetensors.torch import save_file

        adapter = run_dir / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(model), str(adapter / "adapter_model.safetensors"))
        base = cfg.model or "(initialised)"
        (adapter / "adapter_config.json").write_text(
            json.dumps(adapter_config(cfg.lora, base, built.lora_names), indent=2)
        )
    plain = copy.deepcopy(model).float().eval()
    merge_lora(plain)
    _dequantize_frozen(plain)
    state = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
    if plain.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = plain.config.to_hf()
    config["torch_dtype"] = config["dtype"] = "float32"
    out = run_dir / "model"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    write_hf_dir(out, config, state, built.tokenizer, built.generation)
    return out


def _dequantize_frozen(model) -> None:
    """Quantized modules no adapter wrapped (QLoRA's base outside the targets) as plain Linears."""
    from llamalab.model.linear import Linear
    from llamalab.model.modules import set_module

    for name, m in list(model.named_modules()):
        if callable(getattr(m, "dequantize", None)) and hasattr(m, "stored_weights"):
            lin = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = torch.nn.Parameter(m.dequantize().float())
            if m.bias is not None:
                lin.bias = torch.nn.Parameter(m.bias.detach().float().clone())
            set_module(model, name, lin)
