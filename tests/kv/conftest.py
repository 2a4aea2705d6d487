"""A tiny LLaMA with a real (small) tokenizer, as an HF directory every command loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from llamalab.io.hf import write_hf_dir
    from llamalab.io.tokenizer import Tokenizer
    from tests.tiny import BASE, hf_model, tiny_bpe

    tokenizer = Tokenizer(tiny_bpe(), eos_token="<|im_end|>")
    hf = hf_model(vocab_size=tokenizer.vocab_size, num_key_value_heads=2)
    config = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    out = tmp_path_factory.mktemp("kv") / "tiny"
    write_hf_dir(out, config, state, tokenizer=tokenizer)
    assert BASE["max_position_embeddings"] >= 128
    return out


@pytest.fixture(autouse=True)
def _fp32_threads():
    torch.manual_seed(0)


import tests.kv.sliding_window  # noqa: E402,F401  (registers the test method and its reference backend)
