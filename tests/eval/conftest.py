"""Fixtures for the evaluation tests: the default model converted to an HF directory (for transformers and
lm-evaluation-harness' own `hf` model), and a small multiple-choice task built from the shipped Alice text."""

from __future__ import annotations

import os

import pytest

# lm-eval and datasets must never try the network in tests (they read these when first imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def shared_model(monkeypatch, smollm):
    """`llamalab eval` commands get the session's model instead of loading their own (loading is tested
    elsewhere)."""
    import llamalab.eval.cli as eval_cli

    monkeypatch.setattr(eval_cli, "load_model", lambda opts: smollm)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """`llamalab convert --model smollm2-135m --out DIR` (fp32 safetensors, config, tokenizer)."""
    from llamalab.convert import convert_to_hf

    out = tmp_path_factory.mktemp("smollm2_hf") / "model"
    convert_to_hf("smollm2-135m", out, "fp32")
    return out


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def cloze_docs_small(alice_text):
    from llamalab.eval.choice import cloze_docs

    return cloze_docs(alice_text, n=12)


@pytest.fixture(scope="session")
def cloze_jsonl(tmp_path_factory, cloze_docs_small):
    from llamalab.eval.choice import docs_to_jsonl

    path = tmp_path_factory.mktemp("tasks") / "alice_cloze.jsonl"
    path.write_text(docs_to_jsonl(cloze_docs_small), encoding="utf-8")
    return path
