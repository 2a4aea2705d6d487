"""LoRA adapters at the Linear-swap seam (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685), and QLoRA's frozen NF4 base (Dettmers et al., arXiv 2305.14314).

`LoRALinear` wraps the module it replaces (`base`: a `Linear`, or an `NF4Linear` for QLoRA) and adds
y = base(x) + s * B A dropout(x) with A (r x in) initialised as PEFT does (Kaiming-uniform, a = sqrt(5)),
B (out x r) zero, so training starts from the base model exactly; s = alpha / r, or alpha / sqrt(r) with
rsLoRA (Kalajdzievski, arXiv 2312.03732). Only A and B train.

IR-QLoRA's information elastic connection (arXiv 2402.05445; reference `htqin/IR-QLoRA` `irqlora.py`),
`iec=True`: two scalars, zero at the start, add parameter-free paths around the adapters:
h = A dropout(x) + beta_A * (x averaged over r contiguous groups of its features), and
u = B h + beta_B * (each h_g repeated over the g-th contiguous group of out/r outputs); y = base(x) + s u. `merge_lora` folds s B A into the base weight
(dequantizing an NF4 base) for export; `adapter_state` and `adapter_config` are the files PEFT loads
(`adapter_model.safetensors`, `adapter_config.json`).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.model.linear import Linear
from llamalab.model.modules import get_module, set_module
from llamalab.train.config import LoRAConfig, QLoRAConfig


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        iec: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise LlamalabError(f"lora.r must be at least 1, not {r}")
        if iec and (base.in_features % r or base.out_features % r):
            widths = f"{base.in_features}, {base.out_features}"
            raise LlamalabError(f"the elastic connection needs widths divisible by r={r} (got {widths})")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        dtype = torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.iec = iec
        if iec:  # the reference's names
            self.lora_default_A_scale = nn.Parameter(torch.zeros(1))
            self.lora_default_B_scale = nn.Parameter(torch.zeros(1))
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = x.to(self.lora_A.weight.dtype)
        h = self.lora_A(self.dropout(xa))
        if self.iec:
            h = h + self.lora_default_A_scale * xa.reshape(*xa.shape[:-1], self.r, -1).mean(-1)
        u = self.lora_B(h)
        if self.iec:
            u = (u.reshape(*u.shape[:-1], self.r, -1) + self.lora_default_B_scale * h.unsqueeze(-1)).reshape(
                u.shape
            )
        return self.base(x) + (u * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight (out x in), fp32: s B A, or with the elastic connection
        s (B + beta_B R)(A + beta_A M) for the group-mean M (r x in) and group-repeat R (out x r)."""
        A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
        if self.iec:
            eye = torch.eye(self.r)
            M = eye.repeat_interleave(self.in_features // self.r, dim=1) / (self.in_features // self.r)
            R = eye.repeat_interleave(self.out_features // self.r, dim=0)
            A = A + self.lora_default_A_scale.float() * M
            B = B + self.lora_default_B_scale.float() * R
        return self.scaling * (B @ A)

    def base_weight(self) -> torch.Tensor:
        """The base weight in fp32 (an NF4 base dequantized)."""
        if hasattr(self.base, "dequantize"):
            return self.base.dequantize().float()
        return self.base.weight.detach().float()

    def merged(self) -> Linear:
        """A plain Linear computing what this module computes (dropout off)."""
        has_bias = getattr(self.base, "bias", None) is not None
        out = Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
        dtype = self.lora_A.weight.dtype if hasattr(self.base, "dequantize") else self.base.weight.dtype
        out.weight = nn.Parameter((self.base_weight() + self.delta_weight()).to(dtype))
        if has_bias:
            out.bias = nn.Parameter(self.base.bias.detach().clone().to(dtype))
        return out


def linear_names(model: nn.Module) -> list[str]:
    """HF names of every decoder linear (the head excluded), in block order."""
    return [
        f"model.layers.{i}.{n}" for i, block in enumerate(model.model.layers) for n in block.linear_names()
    ]


def matching(model: nn.Module, targets: list[str]) -> list[str]:
    """Decoder linears whose name matches a target name or fnmatch pattern, as its last part (`q_proj`),
    within its block (`mlp.*`) or in full (`model.layers.1[0-5].*`)."""
    names = linear_names(model)

    def forms(name: str) -> tuple[str, ...]:
        return name.rpartition(".")[2], name.split(".", 3)[3], name

    chosen = [n for n in names if any(fnmatch.fnmatch(f, t) for f in forms(n) for t in targets)]
    if not chosen:
        kinds = sorted({n.rpartition(".")[2] for n in names})
        raise LlamalabError(f"lora.targets {targets} match no module; the model has {', '.join(kinds)}")
    return chosen


def quantize_base_nf4(model: nn.Module, cfg: QLoRAConfig) -> None:
    """QLoRA's base: every decoder linear stored as NF4 (double-quantized absmax by default, IR-QLoRA's
    calibrated shifts with `icq`), frozen."""
    from llamalab.quant.nf4 import NF4Linear

    model.unfuse()
    for name in linear_names(model):
        lin = get_module(model, name)
        bias = None if lin.bias is None else lin.bias.detach()
        q = NF4Linear.from_weight(
            lin.weight.detach().float(), bias, cfg.block_size, cfg.double_quant, cfg.icq
        )
        q.prepare()
        set_module(model, name, q)


def apply_lora(model: nn.Module, cfg: LoRAConfig, iec: bool = False) -> list[str]:
    """Wrap the target linears in LoRALinear (with IR-QLoRA's elastic connection if `iec`) and freeze
    everything else; the names adapted."""
    model.unfuse()
    names = matching(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = LoRALinear(get_module(model, name), cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, iec)
        set_module(model, name, module)
    return names


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by the plain Linear it computes (for export and fast inference)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            set_module(model, name, m.merged())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
            if m.iec:  # IR-QLoRA's scalars, under the names its reference saves
                out[f"base_model.model.{name}.lora_default_A_scale"] = m.lora_default_A_scale.detach().clone()
                out[f"base_model.model.{name}.lora_default_B_scale"] = m.lora_default_B_scale.detach().clone()
    return out


def adapter_config(cfg: LoRAConfig, base: str, names: list[str]) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for these adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": sorted({n.rpartition(".")[2] for n in names}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
