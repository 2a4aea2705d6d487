"""What `llamalab info` reports about a loaded model."""

from __future__ import annotations

from collections import Counter
from typing import Any


def model_info(llm) -> dict[str, Any]:
    """Architecture, size in parameters and bytes, context, tokenizer and chat template of `llm`."""
    cfg, ckpt, tok = llm.config, llm.checkpoint, llm.tokenizer
    info: dict[str, Any] = {
        "model": llm.name,
        "source": str(ckpt.source),
        "format": ckpt.format,
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "context_length": cfg.max_position_embeddings,
        "layer_types": dict(Counter(cfg.layer_types)),
        "parameters": llm.model.num_parameters(),
        "dtype": str(llm.dtype).replace("torch.", ""),
        "bytes_in_memory": llm.model.weight_bytes(),
        "tokenizer": type(tok.backend.model).__name__,
        "tokenizer_vocab": tok.vocab_size,
        "bos_token": tok.bos_token,
        "eos_token_ids": llm.eos_token_ids,
        "chat_template": tok.chat_template,
    }
    if ckpt.tensor_types:
        info["gguf_tensor_types"] = dict(Counter(ckpt.tensor_types.values()))
    return info
