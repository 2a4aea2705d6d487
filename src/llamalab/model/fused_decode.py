"""Decode steps in one native call (`llamalab.kernels.decode_step`), where the model allows it.

A decode step of a small model is as much dispatch as arithmetic: ~600 small PyTorch ops a token beside the
GEMVs (benchmarks/gemv.py --decode). The native step runs the whole stack, final norm and head in C++ with
the same rounding as the PyTorch path (see decode_step.cpp), for one sequence or a serving batch (each at
its own position, sharing each read of the weights), so `Transformer.forward` hands it every one-new-token
pass it can take, and everything else (prefill, chunked scoring) runs as before.

It takes a pass only when nothing a method plugs in would be bypassed:
  * no gradient is being recorded, the model is bf16 or fp32 on the CPU and the kernels are available;
  * the cache is the plain `DenseCache` (KV-cache methods keep their own `update`), the attention backend
    is SDPA, the rows are distinct and every position fits the cache (otherwise the PyTorch path raises
    its own error);
  * every block is the plain architecture: RMSNorm norms; each projection a plain `Linear`, a weight-only
    int8/int4 `UniformQuantLinear` or an `NF4Linear` on the native kernels (so LoRA and the other quantized
    formats take the PyTorch path); a plain head; no biases, no hooks on any of them.
Each projection is passed as the module's own tensors (a Parameter stays the same object when `.to()` or
`.data =` changes its storage; a quantized module's buffers are re-checked by identity every step).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from llamalab import kernels
from llamalab.kv.dense import DenseCache
from llamalab.model.attention import sdpa_attention
from llamalab.model.linear import Linear
from llamalab.model.rope import rope_cos_sin
from llamalab.quant.base import NATIVE_DTYPES, NO_PERM, UniformQuantLinear
from llamalab.quant.nf4 import NF4Linear

_EMPTY = torch.empty(0)
_QUANT_BUFFERS = ("qweight", "scales", "qzeros")


def fused_decode_logits(
    model, input_ids: torch.Tensor, starts: list[int], cache, rows: list[int]
) -> torch.Tensor | None:
    """Logits (B, 1, V) of the one new token of each sequence in `input_ids` (B, 1), sequence b at position
    `starts[b]` of cache row `rows[b]`, having written their keys and values into the cache; or None when
    this pass must take the PyTorch path."""
    if torch.is_grad_enabled() or type(cache) is not DenseCache or len(set(rows)) != len(rows):
        return None
    if not all(0 <= s < cache.max_len for s in starts):
        return None  # the PyTorch path raises the context error
    embed = model.model.embed_tokens.weight
    dtype = embed.dtype
    if (
        dtype not in (torch.bfloat16, torch.float32)
        or embed.device.type != "cpu"
        or cache.k[0].dtype != dtype
    ):
        return None
    op = kernels.decode_step()
    plan = _plan(model, dtype) if op is not None else None
    if plan is None:
        return None
    positions = torch.tensor(starts)
    cos, sin = rope_cos_sin(model.inv_freq, positions[:, None], model.attention_factor, dtype)
    attn = model.model.layers[0].self_attn
    logits = op(
        embed[input_ids[:, 0]],
        cos[:, 0],
        sin[:, 0],
        plan.tensors,
        cache.k,
        cache.v,
        torch.tensor(rows),
        positions,
        attn.n_heads,
        model.model.norm.eps,
        attn.scale,
        model.model.norm.weight,
        model.lm_head.weight,
    )
    return logits[:, None]


# What the native step reads from a model is collected once (walking ~400 modules costs ~0.8 ms, a tenth of a
# token) and reused while nothing changed. Any module or parameter assignment anywhere (a Linear swap, LoRA,
# `m.weight = ...`) bumps this counter through torch's global registration hooks; hooks, backends, fused
# quantized modules' buffers (replaced by `model.to(...)`) are re-checked every step, which costs ~40 us.
_structure_version = 0


def _structure_changed(*_args) -> None:
    global _structure_version
    _structure_version += 1


for _register in (
    nn.modules.module.register_module_module_registration_hook,
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
):
    _register(_structure_changed)


@dataclass
class _Plan:
    version: int
    dtype: torch.dtype
    tensors: list[torch.Tensor]  # per layer: the two norms, then q, k, v, o, gate, up, down (4 tensors each)
    attentions: list[nn.Module]
    buffers: list[tuple[dict, str, torch.Tensor]]  # (module._buffers, name, the tensor passed)
    hook_dicts: list[dict]  # every forward (pre-)hook dict of every module the step bypasses

    def valid(self, dtype: torch.dtype) -> bool:
        return (
            self.version == _structure_version
            and self.dtype == dtype
            and not any(map(len, self.hook_dicts))
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and all(a.backend is sdpa_attention for a in self.attentions)
            and all(d[name] is t for d, name, t in self.buffers)
        )


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model, dtype: torch.dtype) -> _Plan | None:
    plan = _plans.get(model)
    if plan is not None and plan.valid(dtype):
        return plan
    plan = _make_plan(model, dtype)
    if plan is None:
        _plans.pop(model, None)
    else:
        _plans[model] = plan
    return plan


def _projection(module: nn.Module, dtype: torch.dtype, plan: _Plan) -> bool:
    """Append `module`'s four tensors to the plan (see projection.h); False when the step cannot take it."""
    if type(module) is Linear and module.bias is None and module.weight.dtype == dtype:
        plan.tensors += [module.weight, _EMPTY, _EMPTY, _EMPTY]
        return True
    if (
        type(module) is UniformQuantLinear
        and module.kernel == "native"
        and module.bias is None
        and module.scales.dtype in NATIVE_DTYPES
    ):
        plan.tensors += [module.qweight, module.scales, module.qzeros]
        plan.tensors.append(NO_PERM if module.perm is None else module.perm)
        plan.buffers += [(module._buffers, name, module._buffers[name]) for name in (*_QUANT_BUFFERS, "perm")]
        return True
    if type(module) is NF4Linear and module.bias is None and (nf4 := module.native_tensors()) is not None:
        plan.tensors += [*nf4, NO_PERM]
        plan.buffers += [
            (module._buffers, name, module._buffers[name]) for name in ("qweight", "absmax_rows")
        ]
        return True
    return False


def _make_plan(model, dtype: torch.dtype) -> _Plan | None:
    """The plan for `model`, or None when any part of it is not the architecture the step implements."""
    from llamalab.model.transformer import RMSNorm

    head, norm = model.lm_head, model.model.norm
    if (
        type(head) is not Linear
        or head.bias is not None
        or head.weight.dtype != dtype
        or type(norm) is not RMSNorm
    ):
        return None
    plan = _Plan(_structure_version, dtype, [], [], [], [])
    modules: list[nn.Module] = [model, model.model, head, norm]
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj)  # fmt: skip
        if not (type(ln1) is RMSNorm and type(ln2) is RMSNorm and attn.backend is sdpa_attention):
            return None
        if ln1.weight.dtype != dtype or ln2.weight.dtype != dtype:
            return None
        plan.tensors += [ln1.weight, ln2.weight]
        if not all(_projection(m, dtype, plan) for m in projections):
            return None
        plan.attentions.append(attn)
        modules += [block, attn, mlp, ln1, ln2, *projections]
    plan.hook_dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
    return plan
