"""Fixtures for the server tests.

Protocol tests run against a tiny randomly initialised LLaMA (2 layers, d=64) that carries the real SmolLM2
tokenizer and chat template, written as an HF directory and served exactly as any checkpoint would be: it
loads in a fraction of a second and decodes fast, so the HTTP behaviour can be exercised thoroughly. What
depends on a real model (greedy parity with `llamalab generate`, JSON-schema output, batch independence)
runs on the embedded SmolLM2-135M and is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamalab.model_options import ModelOptions
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig

from .serve_helpers import TINY_NAME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_path) -> Path:
    """A 2-layer LLaMA with random weights and SmolLM2's tokenizer, as an HF directory."""
    from llamalab.io.gguf import GGUFFile
    from llamalab.io.hf import write_hf_dir
    from llamalab.io.tokenizer import Tokenizer
    from llamalab.model.config import ModelConfig
    from llamalab.model.transformer import Transformer

    tokenizer = Tokenizer.from_gguf(GGUFFile(smollm_path).metadata, source=str(smollm_path))
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
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
    out = tmp_path_factory.mktemp("serve") / "tiny-llama"
    write_hf_dir(out, config.to_hf(), state, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    import llamalab

    return llamalab.load(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_server(tiny_llm, tiny_model_dir) -> str:
    """A server for the tiny model on a free loopback port (in this process, on a thread)."""
    config = ServeConfig(
        ModelOptions(str(tiny_model_dir), context=256),
        served_model_name=TINY_NAME,
        port=0,
        max_batch=4,
        max_queue=4,
        max_body_bytes=64 * 1024,
    )
    with BackgroundServer(config, tiny_llm) as url:
        yield url


@pytest.fixture(scope="session")
def real_server(smollm) -> str:
    """A server for the embedded SmolLM2-135M (16 slots, so 16 clients run in one batch)."""
    config = ServeConfig(ModelOptions("smollm2-135m", context=1024), port=0, max_batch=16, max_queue=16)
    with BackgroundServer(config, smollm) as url:
        yield url
