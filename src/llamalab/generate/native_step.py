"""The native decode step: one decode step of the whole model in one call (`llamalab.kernels.decode_step`).

A decode step of a small model is as much dispatch as arithmetic: ~600 small PyTorch ops a token beside the
GEMVs (benchmarks/gemv.py --decode). The native step runs the whole stack, final norm and head in C++ with
the same rounding as the PyTorch path (see decode_step.cpp), for one sequence or a serving batch (each at
its own position, sharing each read of the weights). The engine (`llamalab.generate.engine`) chooses it
when it is created, and says which path it took (`Engine.decode_path`); prefill always runs the model.

`NativeDecoder.create(model, cache)` takes a model only when nothing would be bypassed:
  * the kernels are available; the model is bf16 or fp32 on the CPU, every layer plain causal attention;
  * the cache is in a layout the step reads and writes in place (`cache.native_kv()`: the dense cache, or
    KIVI's packed codes, which it dequantizes inside attention), in the model's dtype;
  * every block is the plain LLaMA block: RMSNorm norms, the SDPA backend, each projection readable by the
    step (`native_tensors(dtype)`: a dense `Linear`, or a quantized format with native kernels; LoRA and the
    other formats answer None), no biases; the head likewise, dense or quantized.
Quantized projections take the integer path (8-bit activations) unless `kernels.integer_dot()` says
otherwise, read at every step.
The step calls no module hooks; an engine created with `native=False` runs the PyTorch path, which does.
It reads the tensors it found when it was created (the kernels parse them once, `kernels.prepare_decode`):
make a new engine after swapping modules or casting.
"""

from __future__ import annotations

import torch

from llamalab import kernels
from llamalab.model.attention import Attention, sdpa_attention
from llamalab.model.linear import native_tensors
from llamalab.model.norm import RMSNorm
from llamalab.model.rope import rope_cos_sin
from llamalab.model.transformer import MLP, Block


class NativeDecoder:
    """Decode steps of one model and its cache through the native kernel."""

    def __init__(self, model, cache, step, kv) -> None:
        self.model, self.cache, self.step, self.kv = model, cache, step, kv

    @classmethod
    def create(cls, model, cache) -> tuple[NativeDecoder | None, str]:
        """(the decoder, "native"), or (None, why the PyTorch path runs instead)."""
        norm = model.model.norm.weight  # the model's compute dtype (the embedding may be stored quantized)
        dtype = norm.dtype
        kv = cache.native_kv()
        if dtype not in (torch.bfloat16, torch.float32) or norm.device.type != "cpu":
            return None, f"the native step runs bf16/fp32 models on the CPU, not {dtype} on {norm.device}"
        layers = _layer_tensors(model, dtype)
        if isinstance(layers, str):
            return None, layers
        head = native_tensors(model.lm_head, dtype)
        if head is None or type(model.model.norm) is not RMSNorm:
            return None, "the head or final norm is not a layout the native step implements"
        if kv is None or kv.dtype != dtype:
            return None, f"the {type(cache).__name__} is not in a layout the native step reads, in {dtype}"
        prepare = kernels.prepare_decode()
        if prepare is None:
            return None, f"native kernels unavailable: {kernels.unavailable_reason()}"
        attn, norm = model.model.layers[0].self_attn, model.model.norm
        step = prepare(
            layers, kv.layout, kv.tensors, kv.settings, attn.n_heads, norm.eps, attn.scale, norm.weight, head
        )
        return cls(model, cache, step, kv), "native"

    def __call__(self, input_ids: torch.Tensor, starts: list[int], rows: list[int]) -> torch.Tensor | None:
        """Logits (B, 1, V) of the one new token of each sequence in `input_ids` (B, 1), sequence b at
        position `starts[b]` of cache row `rows[b]`, having written their keys and values into the cache;
        None when the pass must take the PyTorch path (which raises the context-length error)."""
        if torch.is_grad_enabled() or len(set(rows)) != len(rows):
            return None
        if not all(0 <= s < self.cache.max_len for s in starts) or not self.kv.accepts(rows, starts):
            return None
        model = self.model
        x = model.model.embed_tokens(input_ids[:, 0])
        positions = torch.tensor(starts)
        inv_freq, attention_factor = model.rope(self.cache.max_len)  # the rotation prefill used
        cos, sin = rope_cos_sin(inv_freq, positions[:, None], attention_factor, x.dtype)
        logits = self.step(x, cos[:, 0], sin[:, 0], torch.tensor(rows), positions, kernels.integer_dot())
        self.kv.advance(rows, starts)
        return logits[:, None]


def _layer_tensors(model, dtype: torch.dtype) -> list[torch.Tensor] | str:
    """Per layer: the two norm weights, then q, k, v, o, gate, up, down as four tensors each (projection.h);
    or why the step cannot run this model."""
    config, norm = model.config, model.model.norm
    if not (config.all_attention and config.causal):
        return "the native step runs causal attention-only stacks"
    tensors: list[torch.Tensor] = []
    for i, block in enumerate(model.model.layers):
        ln1, ln2, attn, mlp = (
            block.input_layernorm,
            block.post_attention_layernorm,
            block.token_mixer,
            block.mlp,
        )
        plain = (
            type(block).forward is Block.forward
            and type(attn).forward is Attention.forward
            and type(mlp).forward is MLP.forward
            and attn.backend is sdpa_attention
            and type(ln1) is RMSNorm
            and type(ln2) is RMSNorm
            and ln1.weight.dtype == ln2.weight.dtype == dtype
            and ln1.eps == ln2.eps == norm.eps
        )
        if not plain:
            return f"block {i} is not the plain LLaMA block the native step implements"
        projections = (attn.native_projections(dtype) or [None]) + (mlp.native_projections(dtype) or [None])
        if any(p is None for p in projections):
            return f"a projection of block {i} has no native form (e.g. LoRA, a bias or another format)"
        tensors += [ln1.weight, ln2.weight, *(t for p in projections for t in p)]
    return tensors
