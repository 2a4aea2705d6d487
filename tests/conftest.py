"""Shared fixtures. Real-model fixtures load the embedded SmolLM2-135M once per session."""

from __future__ import annotations

import pytest
import torch


def pytest_sessionstart(session):
    """Build the native kernels (minutes on 2 cores, once per machine) before any test runs, so no test that
    starts a subprocess with a timeout pays for the build inside its deadline."""
    from llamalab import kernels

    kernels.unavailable_reason()


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


@pytest.fixture(scope="session")
def native_kernels():
    """`llamalab.kernels`, built and self-checked, for the tests of the native kernels.

    Where the kernels are not meant to run (a CPU without their instructions, or LLAMALAB_KERNELS=0) those
    tests skip, all with this one reason. On a CPU that has the instructions a compile error or a failed
    self-check fails them: the library falls back to PyTorch quietly, the tests must not.
    """
    from llamalab import kernels

    if kernels.unsupported_reason() is not None:
        pytest.skip(f"native kernels not supported here: {kernels.unsupported_reason()}")
    if kernels.unavailable_reason() is not None:
        pytest.fail(f"native kernels broken on a CPU that supports them: {kernels.unavailable_reason()}")
    return kernels


@pytest.fixture(scope="session")
def kernels_expected() -> bool:
    """True where the native kernels must be in use (see `native_kernels`), for tests that check which
    implementation a module picked."""
    from llamalab import kernels

    return kernels.unsupported_reason() is None


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python with its CPU backend loaded (llamalab/llama_cpp_peer.py): the reference for llama.cpp's
    own formats and tokenizers. `make setup` builds it; without it these tests fail, they never skip."""
    from llamalab import llama_cpp_peer
    from llamalab.errors import LlamalabError

    try:
        return llama_cpp_peer.load()
    except LlamalabError as e:
        pytest.fail(f"the llama.cpp peer is missing: {e}")
