"""Model configuration, read from a Hugging Face `config.json` or from GGUF metadata.

One dataclass describes every LLaMA-family checkpoint we load (LLaMA 1/2/3/3.x, SmolLM, TinyLlama). Field
names follow transformers' `LlamaConfig`, so `from_hf` / `to_hf` are near-identities and a converted
directory loads in `transformers.AutoModelForCausalLM` unchanged. Which architectures a config may name is
the architecture registry's business (`llamalab.model.registry`); other architectures subclass this.

Beyond LlamaConfig: `layer_types` gives each layer's mixer (`"attention"` for every layer of a LLaMA; a
hybrid stack names others, see `llamalab.model.mixers`) and `causal` says whether tokens see only the past
(False for diffusion LMs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import CheckpointError
from llamalab.model.rope_types import from_hf_scaling, to_hf_scaling


@dataclass
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF v4 `rope_scaling` / v5 `rope_parameters` without the theta; None means plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    layer_types: list[str] | None = None  # one per layer; default: attention everywhere
    causal: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act={self.hidden_act!r} is not supported (LLaMA uses 'silu')")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") == "default":
            self.rope_scaling = None
        # HF's name for plain attention layers (in configs that list layer types) is ours, "attention".
        types = [("attention" if t == "full_attention" else t) for t in self.layer_types or []]
        self.layer_types = types or ["attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 for MHA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def all_attention(self) -> bool:
        """Whether every layer is plain attention (what the native decode step and prefix reuse need)."""
        return all(t == "attention" for t in self.layer_types)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed HF `config.json` (the architecture registry has checked that it names an
        architecture this class describes)."""
        rope_theta = cfg.get("rope_theta")
        scaling = cfg.get("rope_scaling")
        max_pos = context = int(cfg.get("max_position_embeddings") or 2048)
        params = cfg.get("rope_parameters")  # transformers v5 puts theta and scaling in one dict
        if isinstance(params, dict):
            params = dict(params)
            rope_theta = params.pop("rope_theta", rope_theta)
            scaling = params if params.get("rope_type", "default") != "default" else scaling
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            # v4 files sometimes say "type" instead of "rope_type".
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            # Our dicts always say L0 explicitly; transformers' meaning of it differs per type.
            scaling, context = from_hf_scaling(scaling, max_pos, cfg.get("original_max_position_embeddings"))
        known = {f.name for f in dataclasses.fields(cls)} - {
            "extra",
            "rope_scaling",
            "rope_theta",
            "architecture",
            "max_position_embeddings",
        }
        kwargs = {k: v for k, v in cfg.items() if k in known}
        kwargs["max_position_embeddings"] = context
        archs = cfg.get("architectures") or []
        if archs:
            kwargs["architecture"] = archs[0]
        try:
            return cls(**kwargs, rope_theta=float(rope_theta or 10000.0), rope_scaling=scaling)
        except TypeError as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `LlamaConfig` reads back to the same model."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "architecture")}
        d["architectures"] = [self.architecture]
        if self.all_attention:  # LlamaConfig has no such field; only other architectures write it
            d.pop("layer_types")
        if self.causal:
            d.pop("causal")
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        else:
            d["rope_scaling"], d["max_position_embeddings"] = to_hf_scaling(
                d["rope_scaling"], self.max_position_embeddings
            )
        # Both spellings, so transformers v4 and v5 read the same RoPE.
        d["rope_parameters"] = {
            "rope_type": "default",
            **(d.get("rope_scaling") or {}),
            "rope_theta": self.rope_theta,
        }
        return d

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str = "gguf") -> ModelConfig:
        """Build from GGUF key/value metadata (llama.cpp's `llama.*` keys)."""

        def key(name: str, default: Any = None, required: bool = False) -> Any:
            value = meta.get(f"llama.{name}", default)
            if required and value is None:
                raise CheckpointError(f"{source}: metadata key 'llama.{name}' is missing")
            return value

        n_head = int(key("attention.head_count", required=True))
        hidden = int(key("embedding_length", required=True))
        vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // n_head
        scaling = None
        scaling_type = key("rope.scaling.type")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif scaling_type == "yarn":
            scaling = {
                "rope_type": "yarn",
                "factor": float(key("rope.scaling.factor")),
                "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            }
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length", required=True)),
            num_hidden_layers=int(key("block_count", required=True)),
            num_attention_heads=n_head,
            num_key_value_heads=int(key("attention.head_count_kv", n_head)),
            head_dim=int(head_dim),
            max_position_embeddings=int(key("context_length", 2048)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
