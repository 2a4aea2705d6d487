"""Tiny random LLaMA models built the same way in transformers and in llamalab, for parity tests."""

from __future__ import annotations

from typing import Any

import torch

from llamalab.model.build import build_model
from llamalab.model.config import ModelConfig

BASE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def hf_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A randomly initialised transformers LlamaForCausalLM (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**BASE, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    # HF initialises norms to 1; perturb them so a wrong norm placement cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def ours_from_hf(hf, dtype: torch.dtype = torch.float32):
    """The llamalab Transformer with the same config and weights as the transformers model `hf`."""
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    return build_model(config, state, dtype)


def write_tiny_smollm_dir(out, smollm_path, context: int = 4096):
    """A 2-layer LLaMA (d=64) with fixed random weights and SmolLM2's real tokenizer and chat template,
    written as an HF directory: loads in a fraction of a second, tokenizes like the default model."""
    from llamalab.io.gguf import GGUFFile
    from llamalab.io.hf import write_hf_dir
    from llamalab.io.tokenizer import Tokenizer
    from llamalab.model.transformer import Transformer

    tokenizer = Tokenizer.from_gguf(GGUFFile(smollm_path).metadata, source=str(smollm_path))
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    gen = torch.Generator().manual_seed(0)
    model = Transformer(config)
    state = {
        k: (torch.ones_like(v) if k.endswith("norm.weight") else torch.randn(v.shape, generator=gen) * 0.5)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    write_hf_dir(out, config.to_hf(), state, tokenizer=tokenizer)
    return out


def tiny_bpe(vocab_size: int = 400):
    """A small byte-level BPE trained on real text, with ChatML special tokens (for tiny GGUF files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llamalab.data import sample_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([sample_text()[:40000]], trainer)
    return tok


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# K-quant block layouts: bytes per 256 weights and byte offsets of their fp16 scale fields.
_KQUANT_F16_FIELDS = {
    "Q2_K": (84, [80, 82]),
    "Q3_K": (110, [108]),
    "Q4_K": (144, [0, 2]),
    "Q5_K": (176, [0, 2]),
}
_KQUANT_F16_FIELDS["Q6_K"] = (210, [208])


def _encode(weight: torch.Tensor, qtype, rng):
    """Bytes of `weight` in GGML type `qtype`; K-quants (no Python quantizer) get random valid blocks."""
    import numpy as np
    from gguf.quants import quantize

    w = weight.float().numpy()
    if qtype.name in _KQUANT_F16_FIELDS:
        size, f16_at = _KQUANT_F16_FIELDS[qtype.name]
        blocks = rng.integers(0, 256, size=(w.size // 256, size), dtype=np.uint8)
        for at in f16_at:  # sane positive scales so the weights are finite and of a usual size
            blocks[:, at : at + 2] = (
                rng.uniform(1e-3, 1e-2, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
            )
        return blocks.reshape(w.shape[0], -1)
    if qtype.name == "F32":
        return w
    return quantize(w, qtype)


def write_tiny_gguf(
    path,
    hf,
    tok,
    qtype: str | list[str] = "F32",
    norm_type: str = "F32",
    rope_freqs: torch.Tensor | None = None,
) -> None:
    """Write transformers model `hf` + tokenizer `tok` as a llama GGUF, weights stored as `qtype` (a list
    of types is used round-robin over the 2-D tensors, so one file can hold every type)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    from llamalab.io.gguf import gguf_name, permute_qk

    cfg = hf.config
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(
        cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    )
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    qtypes = [qtype] if isinstance(qtype, str) else list(qtype)
    matrices = 0
    for name, t in hf.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().float()
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, cfg.num_key_value_heads)
        if t.dim() == 1:
            kind = GGMLQuantizationType[norm_type]
        else:
            kind = GGMLQuantizationType[qtypes[matrices % len(qtypes)]]
            matrices += 1
        data = _encode(t, kind, rng)
        if kind.name == "F32":
            w.add_tensor(gguf_name(name), data)
        else:
            w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=kind)
    if rope_freqs is not None:  # llama.cpp's per-frequency RoPE divisors (Llama 3.x scaling)
        w.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_dir(out, seed: int = 0, **overrides: Any):
    """A tiny random LLaMA with the small trained BPE (ChatML template, EOS <|im_end|>) as an HF directory
    every command loads; returns `out`."""
    from llamalab.io.hf import write_hf_dir
    from llamalab.io.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_bpe(), eos_token="<|im_end|>", chat_template=CHATML)
    hf = hf_model(seed=seed, vocab_size=tokenizer.vocab_size, **{"num_key_value_heads": 2, **overrides})
    config = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    write_hf_dir(
        out, config, state, tokenizer=tokenizer, generation_config={"eos_token_id": tokenizer.eos_token_id}
    )
    return out


def tiny_chat_llm(context: int = 96):
    """A tiny random model with the tiny BPE (`<|im_end|>` ends a turn) as a `llamalab.LLM`."""
    from llamalab.api import LLM
    from llamalab.io.load import Checkpoint
    from llamalab.io.tokenizer import Tokenizer

    tok = Tokenizer(tiny_bpe(), eos_token="<|im_end|>")
    model = ours_from_hf(
        hf_model(vocab_size=tok.vocab_size, num_key_value_heads=2, max_position_embeddings=context)
    )
    ckpt = Checkpoint(model.config, {}, tok, {"eos_token_id": []}, source=None, format="test")
    return LLM(model, ckpt, "tiny")
