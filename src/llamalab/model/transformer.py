"""The LLaMA decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, tied or untied head.

Parameter names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`), so HF
safetensors load with no mapping and every method that swaps `nn.Linear` modules finds them by those names.
Numerics follow transformers' `LlamaForCausalLM` op for op (RMSNorm in fp32, cos/sin cast to the activation
dtype), which is what the parity tests hold us to.

A model built here is a plain training-ready module: each weight is one registered parameter. `fuse()` (what
`llamalab.load` does for inference) runs q/k/v and gate/up as single matmuls and `unfuse()` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llamalab.errors import LlamalabError
from llamalab.kv.base import KVCache
from llamalab.model.attention import AttnContext, get_attention_backend
from llamalab.model.config import ModelConfig
from llamalab.model.linear import Fusable, Linear, LinearGroup, native_tensors
from llamalab.model.mixers import create_mixer
from llamalab.model.norm import RMSNorm
from llamalab.model.registry import Architecture, register_architecture
from llamalab.model.rope import is_length_dependent, rope_cos_sin, rope_frequencies

Positions = int | list[int] | torch.Tensor


class MLP(Fusable):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fusion = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.run("gate_up_proj", x)
        return self.down_proj(F.silu(gate) * up)

    def linear_groups(self, input_op: str) -> list[LinearGroup]:
        return [
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), input_op, "mlp"),
            LinearGroup(("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"),
        ]

    def native_projections(self, dtype: torch.dtype) -> list[list[torch.Tensor]] | None:
        """gate, up and down as the native decode step reads them, or None."""
        fused = self._modules.get("gate_up_proj")
        gate_up = fused.native_parts(dtype) if fused is not None else [
            native_tensors(self.gate_proj, dtype), native_tensors(self.up_proj, dtype)
        ]  # fmt: skip
        out = [*(gate_up or [None]), native_tensors(self.down_proj, dtype)]
        return None if any(t is None for t in out) else out


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)). The mixer is the layer type's
    (attention for LLaMA; see `llamalab.model.mixers`)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        mixer = create_mixer(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer_name = mixer.attribute
        setattr(self, self.mixer_name, mixer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    @property
    def token_mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.token_mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def linear_groups(self) -> list[LinearGroup]:
        """This block's linears by shared input, in the order the block runs them."""
        return [
            *self.token_mixer.linear_groups("input_layernorm"),
            *self.mlp.linear_groups("post_attention_layernorm"),
        ]

    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups() for name in group.linears]


class Decoder(nn.Module):
    """The `model.` part of an HF checkpoint: embedding, blocks, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.activation_checkpointing = False


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
        # Plain attributes, not buffers: they must stay fp32 when the model is cast to bf16. `inv_freq` is the
        # rotation at the model's context; length-dependent scalings get theirs from `rope(length)`.
        self.inv_freq, self.attention_factor = rope_frequencies(self.config)
        self.rope_depends_on_length = is_length_dependent(self.config.rope_scaling)
        self._rope_by_length: dict[int, tuple[torch.Tensor, float]] = {}

    def rope(self, length: int | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention_factor) for a sequence of `length` tokens (see `llamalab.model.rope`: dynamic
        NTK and LongRoPE depend on it; every other type returns the same pair for any length)."""
        if not self.rope_depends_on_length or length is None:
            return self.inv_freq, self.attention_factor
        if length not in self._rope_by_length:
            if len(self._rope_by_length) > 64:  # evaluations sweep lengths; keep the memo small
                self._rope_by_length.clear()
            self._rope_by_length[length] = rope_frequencies(self.config, length)
        return self._rope_by_length[length]

    def fuse(self) -> None:
        """Run q/k/v and gate/up as one matmul each, for inference (plain Linear parts only; the state dict
        keeps HF names). `unfuse()` undoes it; replacing a part through `llamalab.model.modules` does too."""
        for m in self.modules():
            if isinstance(m, Fusable):
                m.fuse()

    def unfuse(self) -> None:
        """Separate fused projections into their HF modules again (before training or module surgery)."""
        for m in self.modules():
            if isinstance(m, Fusable):
                m.unfuse()

    def set_activation_checkpointing(self, on: bool) -> None:
        """Keep only each block's input during a training forward and recompute the block in backward
        (non-reentrant checkpointing, so frozen parameters and dropout's random state are handled)."""
        self.model.activation_checkpointing = on

    def set_attention_backend(self, name: str) -> None:
        backend = get_attention_backend(name)
        for block in self.model.layers:
            if hasattr(block.token_mixer, "backend"):
                block.token_mixer.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Positions | None = None,
        cache: KVCache | None = None,
        rows: list[int] | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        causal: bool | None = None,
        last_only: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T).

        `positions`: each token's position, as a (B, T) or (T,) tensor, a list of each row's first position,
        or one int for all rows; by default 0.. for every row, restarting at each document when `doc_ids`
        (B, T) is given. `doc_ids` confines attention to tokens of the same document (packed sequences).
        `causal` overrides the config's (False: every token sees every other, for diffusion LMs).
        With a `cache`, past keys/values are read from and written to its `rows` (default 0..B-1), the new
        tokens of row b at consecutive positions from its first.
        `last_only` computes the output for the last position only (what generation needs); `hidden` returns
        the final normed hidden states (B, T, d) instead of logits (for losses that apply the head in chunks).
        """
        B, T = input_ids.shape
        device = input_ids.device
        causal = self.config.causal if causal is None else causal
        pos, starts = _positions(positions, doc_ids, B, T, device, cache is not None)
        if doc_ids is not None and bool((doc_ids == doc_ids[:, :1]).all()):
            doc_ids = None  # one document per row: plain attention (SDPA's causal fast path, no T x T mask)
        if cache is not None:
            if doc_ids is not None or not causal:
                raise LlamalabError("a KV cache serves causal attention over one document per row")
            rows = list(range(B)) if rows is None else rows
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        length = None
        if self.rope_depends_on_length:  # one rotation per sequence: its cache's length, or this pass's
            length = cache.max_len if cache is not None else int(pos.max()) + 1
        inv_freq, attention_factor = self.rope(length)
        cos, sin = rope_cos_sin(inv_freq.to(device), pos, attention_factor, x.dtype)
        ctx = AttnContext(cos, sin, cache, rows, starts, doc_ids, causal)
        recompute = self.model.activation_checkpointing and torch.is_grad_enabled()
        for block in self.model.layers:
            x = checkpoint(block, x, ctx, use_reentrant=False) if recompute else block(x, ctx)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if hidden else self.lm_head(x)  # (B, T, d) or (B, T, V)

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


def _positions(
    positions: Positions | None, doc_ids: torch.Tensor | None, B: int, T: int, device, for_cache: bool
) -> tuple[torch.Tensor, list[int] | None]:
    """Each token's position (B, T), and for a pass through a cache each row's first position (its tokens
    must then be consecutive)."""
    steps = torch.arange(T, device=device)
    if positions is None and doc_ids is not None:  # packed documents: positions restart at each one
        new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
        new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        first = torch.where(new_doc, steps, torch.zeros_like(steps)).cummax(dim=1).values
        return steps - first, None
    if positions is None:
        positions = 0
    if isinstance(positions, int):
        return positions + steps.expand(B, T), [positions] * B
    if isinstance(positions, list):
        if len(positions) != B:
            raise LlamalabError(f"{len(positions)} start positions for a batch of {B} rows")
        return torch.tensor(positions, device=device)[:, None] + steps, list(positions)
    pos = positions.to(device=device, dtype=torch.long).expand(B, T)
    if not for_cache:
        return pos, None
    if not bool((pos == pos[:, :1] + steps).all()):
        raise LlamalabError("with a KV cache, each row's positions must be consecutive")
    return pos, pos[:, 0].tolist()


register_architecture(
    Architecture("LlamaForCausalLM", ModelConfig, Transformer, model_types=("llama",), gguf=("llama",))
)
