"""The one place for model options: parsing, RoPE scaling and the context, the shared CLI options."""

from __future__ import annotations

import copy
from typing import Annotated

import pytest
import torch
import typer
from typer.testing import CliRunner

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.kv.registry import CacheSpec
from llamalab.model_options import ModelOptions, apply_rope_scaling, check_length, model_options


def test_from_kwargs_coerces_and_accepts_lm_eval_spelling():
    opts = ModelOptions.from_kwargs(pretrained="m.gguf", rope_factor="4", kv_bits="2", threads=2)
    assert (opts.model, opts.rope_factor, opts.kv_bits, opts.threads) == ("m.gguf", 4.0, 2, 2)
    with pytest.raises(LlamalabError, match="unknown model option.*temperature"):
        ModelOptions.from_kwargs(temperature=1)
    with pytest.raises(LlamalabError, match="not a number"):
        ModelOptions.from_kwargs(kv_bits="two")


def test_kv_options_make_one_cache_spec():
    opts = ModelOptions(kv="dense", kv_bits=2, kv_group_size=32, kv_args={"residual": "32"})
    assert opts.kv_spec == CacheSpec("dense", 2, 32, {"residual": "32"})


def test_shared_cli_options_reach_the_command():
    app = typer.Typer()
    seen = {}

    @app.command()
    @model_options
    def cmd(size: Annotated[int, typer.Option(help="own option")] = 3, *, opts: ModelOptions) -> None:
        seen.update(size=size, opts=opts)

    result = CliRunner().invoke(
        app,
        [
            "--size",
            "5",
            "--model",
            "x.gguf",
            "--rope-scaling",
            "linear",
            "--rope-factor",
            "2",
            "--kv",
            "dense",
            "--kv-arg",
            "residual=32",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen["size"] == 5
    assert seen["opts"] == ModelOptions(
        model="x.gguf", threads=1, rope_scaling="linear", rope_factor=2.0, kv_args={"residual": "32"}
    )
    help_text = CliRunner().invoke(app, ["--help"]).output
    for flag in ("--rope-scaling", "--kv-bits", "--dtype", "--size"):
        assert flag in help_text


@pytest.mark.slow
def test_rope_scaling_extends_the_context(smollm):
    llm = copy.deepcopy(smollm)  # the session model must keep its config
    with pytest.raises(ContextLengthError, match="beyond the model's context of 8192.*--rope-scaling"):
        check_length(llm, 16384, "a prompt")
    apply_rope_scaling(llm, ModelOptions(rope_scaling="linear", rope_factor=2.0))
    assert llm.config.max_position_embeddings == 16384
    assert llm.config.rope_scaling["original_max_position_embeddings"] == 8192
    check_length(llm, 16384, "a prompt")
    # Position interpolation: the frequencies are the original ones divided by the factor.
    torch.testing.assert_close(llm.model.inv_freq * 2.0, smollm.model.inv_freq)
    with pytest.raises(LlamalabError, match="unknown --rope-scaling 'nosuch'"):
        apply_rope_scaling(llm, ModelOptions(rope_scaling="nosuch", rope_factor=2.0))
    with pytest.raises(
        LlamalabError, match=r"--rope-scaling linear needs --rope-factor F \(the extension ratio, >= 1\)"
    ):
        apply_rope_scaling(llm, ModelOptions(rope_scaling="linear"))


@pytest.mark.slow
def test_context_without_scaling_only_shortens(smollm):
    llm = copy.deepcopy(smollm)
    apply_rope_scaling(llm, ModelOptions(context=1024))
    assert llm.config.max_position_embeddings == 1024 and llm.config.rope_scaling is None
    with pytest.raises(LlamalabError, match="--context 4096 is outside 2..1024"):
        apply_rope_scaling(llm, ModelOptions(context=4096))
