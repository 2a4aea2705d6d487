"""The model a run trains: loaded from a checkpoint or initialised from a config, then transformed in a
fixed order (QLoRA's NF4 base, then LoRA adapters, then activation checkpointing), with what is trainable
decided once, before any wrapper sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.train.config import TrainConfig


@dataclass
class Built:
    model: nn.Module  # the Transformer (transformed in place)
    tokenizer: object
    generation: dict = field(default_factory=dict)  # generation_config.json defaults, for export
    lora_names: list[str] = field(default_factory=list)


def build_model(cfg: TrainConfig) -> Built:
    import llamalab

    if cfg.model:
        llm = llamalab.load(cfg.model, dtype="fp32")
        model, tokenizer = llm.model, llm.tokenizer
        generation = {**llm.checkpoint.generation, "eos_token_id": llm.eos_token_ids}
        model.unfuse()  # training holds each weight as its own parameter
    else:
        donor = llamalab.load(cfg.tokenizer, dtype="fp32")  # its tokenizer and chat template
        tokenizer = donor.tokenizer
        generation = {"eos_token_id": donor.eos_token_ids}
        model = init_model(cfg.init, tokenizer, cfg.seed)
    model.train()
    names: list[str] = []
    if cfg.qlora is not None:
        from llamalab.train.lora import quantize_base_nf4

        quantize_base_nf4(model, cfg.qlora)
    if cfg.lora is not None:
        from llamalab.train.lora import apply_lora

        names = apply_lora(model, cfg.lora, iec=cfg.qlora is not None and cfg.qlora.iec)
    if cfg.activation_checkpointing:
        model.set_activation_checkpointing(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise LlamalabError("nothing to train: every parameter is frozen")
    return Built(model, tokenizer, generation, names)


def init_model(fields: dict, tokenizer, seed: int) -> nn.Module:
    """A new LLaMA of the config `fields` (vocabulary from the tokenizer), initialised as transformers
    initialises LlamaForCausalLM: normal(0, initializer_range) weights, unit norms."""
    from llamalab.model.config import ModelConfig
    from llamalab.model.transformer import Transformer

    fields = dict(fields)
    std = float(fields.pop("initializer_range", 0.02))
    fields.setdefault("vocab_size", tokenizer.vocab_size)
    fields.setdefault("tie_word_embeddings", True)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    try:
        config = ModelConfig(**fields)
    except TypeError as e:
        raise LlamalabError(f"train config: init: {e}") from None
    torch.manual_seed(seed)
    model = Transformer(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, mean=0.0, std=std)
    return model
