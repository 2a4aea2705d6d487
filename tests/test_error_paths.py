"""What llamalab refuses, and how: each refusal is one LlamalabError that names the problem and what is known
(the CLI prints it as one line, tests/test_cli.py), never a crash deeper down or a silently wrong model."""

from __future__ import annotations

import json

import pytest
import torch

import llamalab
from llamalab.errors import CheckpointError, LlamalabError
from tests.tiny import hf_model, ours_from_hf, tiny_bpe


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny LLaMA as an HF directory whose config.json a test may edit."""
    path = tmp_path / "tiny"
    hf_model(num_key_value_heads=2).save_pretrained(path)
    tiny_bpe().save(str(path / "tokenizer.json"))
    return path


def edit_config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_rope_type_is_refused_naming_the_known_ones(tiny_dir):
    edit_config(tiny_dir, rope_scaling={"rope_type": "nosuch", "factor": 2.0}, rope_parameters=None)
    with pytest.raises(
        CheckpointError, match=r"rope_scaling type 'nosuch' is not supported; known types: .*llama3.*yarn"
    ):
        llamalab.load(str(tiny_dir))


def test_an_activation_other_than_silu_is_refused(tiny_dir):
    edit_config(tiny_dir, hidden_act="gelu")
    with pytest.raises(CheckpointError, match=r"hidden_act='gelu' is not supported \(LLaMA uses 'silu'\)"):
        llamalab.load(str(tiny_dir))


@pytest.mark.parametrize("dtype", ["fp8", "fp64", "int8"])
def test_unknown_dtype_is_refused_naming_the_known_ones(tiny_dir, dtype):
    with pytest.raises(LlamalabError, match=rf"unknown dtype '{dtype}'; use one of fp32, bf16, fp16"):
        llamalab.load(str(tiny_dir), dtype=dtype)


def test_unknown_attention_backend_is_refused_and_the_model_keeps_working(tiny_dir):
    llm = llamalab.load(str(tiny_dir))
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        before = llm.model(ids)
        with pytest.raises(LlamalabError, match=r"unknown attention backend 'nope'; known: .*sdpa"):
            llm.model.set_attention_backend("nope")
        assert torch.equal(llm.model(ids), before)


def test_quantizing_an_already_quantized_model_is_refused():
    from llamalab.quant import QuantLinear, quantize_model

    llm = type("L", (), {})()
    llm.model = ours_from_hf(hf_model(num_key_value_heads=2))
    llm.config = llm.model.config
    quantize_model(llm, "rtn", 4, 32, progress=False)
    codes = {n: m.qweight.clone() for n, m in llm.model.named_modules() if isinstance(m, QuantLinear)}
    with pytest.raises(LlamalabError, match="already quantized; load the original weights"):
        quantize_model(llm, "rtn", 8, -1, progress=False)
    after = {n: m.qweight for n, m in llm.model.named_modules() if isinstance(m, QuantLinear)}
    assert codes.keys() == after.keys() and all(torch.equal(codes[n], after[n]) for n in codes)  # untouched


def test_unknown_dtype_on_the_command_line_is_one_line(tiny_dir, capsys):
    from llamalab.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--dtype", "fp8"]) == 1
    assert (
        capsys.readouterr().err
        == "error: unknown dtype 'fp8'; use one of fp32, bf16, fp16 (or stored / auto, for a GGUF file)\n"
    )
