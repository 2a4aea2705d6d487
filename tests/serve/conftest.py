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

from llamalab.model_options import ModelOptions
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig

from .serve_helpers import TINY_NAME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_path) -> Path:
    """A 2-layer LLaMA with random weights and SmolLM2's tokenizer, as an HF directory."""
    from tests.tiny import write_tiny_smollm_dir

    return write_tiny_smollm_dir(tmp_path_factory.mktemp("serve") / "tiny-llama", smollm_path)


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
