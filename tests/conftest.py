"""Shared fixtures. Real-model fixtures load the embedded SmolLM2-135M once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, fp32 (mark tests that use it `slow`)."""
    import llamalab

    return llamalab.load("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def smollm_path():
    from llamalab.io.registry import resolve_alias

    return resolve_alias("smollm2-135m")


@pytest.fixture(scope="session")
def alice_text() -> str:
    from llamalab.data import sample_text

    return sample_text()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA with a small real tokenizer and a chat template, as an HF directory."""
    from tests.tiny import write_tiny_dir

    return write_tiny_dir(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernels_disabled(monkeypatch):
    """LLAMALAB_KERNELS=0 for one test; the next resolution afterwards re-reads the real environment."""
    from llamalab import kernels

    monkeypatch.setenv("LLAMALAB_KERNELS", "0")
    kernels.reset()
    yield
    monkeypatch.undo()
    kernels.reset()
