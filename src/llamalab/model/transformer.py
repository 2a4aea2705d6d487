"""The LLaMA decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, tied or untied head.

Parameter names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`), so HF
safetensors load with no mapping and every method that swaps `nn.Linear` modules finds them by those names.
Numerics follow transformers' `LlamaForCausalLM` op for op (RMSNorm in fp32, cos/sin cast to the activation
dtype), which is what the parity tests hold us to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.kv.base import KVCache
from llamalab.model.attention import Attention, get_attention_backend
from llamalab.model.config import ModelConfig
from llamalab.model.fused_decode import fused_decode_logits
from llamalab.model.linear import FusedLinears, Linear
from llamalab.model.rope import rope_cos_sin, rope_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as transformers does, then scale in x's dtype.
        # F.rms_norm is one fused op and bit-identical to the written-out formula.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
        self.gate_up: FusedLinears | None = None

    def fuse(self) -> None:
        """Run gate/up as one matmul at inference (see FusedLinears)."""
        self.gate_up = FusedLinears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up:
            gate, up = self.gate_up(x, (self.gate_proj, self.up_proj)).split(self.gate_up.sizes, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, rows=None, starts=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, rows, starts)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of an HF checkpoint: embedding, blocks, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """A LLaMA-family causal LM (HF `LlamaForCausalLM` layout)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.refresh_rope()

    def refresh_rope(self) -> None:
        """Recompute RoPE frequencies from `self.config` (after a context-extension method changes it)."""
        # A plain attribute, not a buffer: it must stay fp32 when the model is cast to bf16.
        self.inv_freq, self.attention_factor = rope_frequencies(self.config)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up matmuls for inference; weights stay addressable under their HF names."""
        for block in self.model.layers:
            attn, mlp = block.self_attn, block.mlp
            # Only plain Linear weights can be concatenated; swapped (quantized) modules run one by one.
            if all(type(m) is Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
                attn.fuse()
            if all(type(m) is Linear for m in (mlp.gate_proj, mlp.up_proj)):
                mlp.fuse()

    def set_attention_backend(self, name: str) -> None:
        backend = get_attention_backend(name)
        for block in self.model.layers:
            block.self_attn.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor,
        starts: int | list[int] = 0,
        cache: KVCache | None = None,
        rows: list[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T) whose first tokens sit at positions `starts` (one per row,
        or one for all). With a `cache`, past keys/values are read from and written to its `rows` (default
        0..B-1). `last_only` computes the head for the last position only (what generation needs)."""
        B, T = input_ids.shape
        if isinstance(starts, int):
            starts = [starts] * B
        if cache is not None and rows is None:
            rows = list(range(B))
        if T == 1 and cache is not None:  # a decode step: one native call where possible
            logits = fused_decode_logits(self, input_ids, starts, cache, rows)
            if logits is not None:
                return logits
        positions = torch.tensor(starts, device=input_ids.device)[:, None] + torch.arange(
            T, device=input_ids.device
        )  # (B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = rope_cos_sin(self.inv_freq.to(input_ids.device), positions, self.attention_factor, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, rows, starts)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))  # (B, T, V)

    def num_parameters(self) -> int:
        """Parameters, counting a tied embedding/head once. Modules that keep their weight in another form
        (a quantized linear holds packed buffers) report how many weights they stand for via
        `stored_weights()`."""
        packed = sum(m.stored_weights() for m in self.modules() if hasattr(m, "stored_weights"))
        return sum(p.numel() for p in self.parameters()) + packed

    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers as they sit in memory (quantized modules report their packing)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
