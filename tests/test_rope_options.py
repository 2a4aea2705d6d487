"""RoPE scaling through the shared model options: `--rope-config` (JSON text or a file) for longrope's
factor lists, one clear error per bad setting, `convert` saving the setting so that transformers rotates the
same way, and length-dependent scalings fixed per sequence through the KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.kv.dense import DenseCache
from llamalab.model.config import ModelConfig
from llamalab.model_options import ModelOptions, scale_config
from tests.test_cli import assert_clean_error, run
from tests.tiny import hf_model, ours_from_hf

LONG = [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]  # 8 pairs: head_dim 16 in the tiny configs


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    return ModelConfig(**{**base, "max_position_embeddings": 256, **kw})


def test_longrope_factor_lists_come_from_json_text_or_a_file(tmp_path):
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": LONG}
    config = tiny_config()
    assert scale_config(config, ModelOptions(rope_config=json.dumps(scaling), rope_factor=4))
    assert config.max_position_embeddings == 1024
    assert config.rope_scaling == {**scaling, "original_max_position_embeddings": 256, "factor": 4.0}
    # A file, here a whole config.json as `longrope search` and `convert` write them; the context sets s.
    path = tmp_path / "rope.json"
    path.write_text(json.dumps({"rope_parameters": {**scaling, "rope_theta": 1e4}}))
    config = tiny_config()
    scale_config(config, ModelOptions(rope_config=str(path), context=512))
    assert config.rope_scaling["factor"] == 2.0 and config.max_position_embeddings == 512
    # yarn with its own betas from the JSON, type and factor from the flags.
    config = tiny_config()
    scale_config(config, ModelOptions(rope_scaling="yarn", rope_factor=2, rope_config='{"beta_fast": 16}'))
    assert config.rope_scaling["beta_fast"] == 16 and config.rope_scaling["rope_type"] == "yarn"
    # The dict itself, as a lab grid's nested YAML hands it over.
    config = tiny_config()
    scale_config(config, ModelOptions(rope_config={"rope_scaling": scaling}, rope_factor=4))
    assert config.rope_scaling == {**scaling, "original_max_position_embeddings": 256, "factor": 4.0}


@pytest.mark.parametrize(
    "opts, message",
    [
        (ModelOptions(rope_scaling="nosuch", rope_factor=2), "unknown --rope-scaling 'nosuch'"),
        (ModelOptions(rope_scaling="linear", rope_factor=0.5), "--rope-factor must be >= 1"),
        (ModelOptions(rope_scaling="yarn"), "--rope-scaling yarn needs --rope-factor"),
        (ModelOptions(rope_scaling="longrope", rope_factor=2), "'longrope' needs short_factor, long_factor"),
        (
            ModelOptions(rope_scaling="llama3", rope_factor=8),
            "'llama3' needs low_freq_factor, high_freq_factor",
        ),
        (
            ModelOptions(rope_scaling="linear", rope_factor=2, context=1000),
            "--context 1000 is beyond what linear",
        ),
        (ModelOptions(rope_factor=2), "--rope-factor needs --rope-scaling"),
        (ModelOptions(rope_config="no/such/file.json"), "is neither a JSON object nor a file"),
        (ModelOptions(rope_config="{1: 2}"), "is not valid JSON"),
        (
            ModelOptions(
                rope_config='{"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}', context=512
            ),
            "one factor per frequency pair (8), got 1",
        ),
    ],
)
def test_bad_rope_options_are_one_clear_error(opts, message):
    with pytest.raises(LlamalabError) as e:
        scale_config(tiny_config(), opts)
    assert message in str(e.value)


def test_cli_refuses_bad_rope_settings_in_one_line(tiny_dir):
    proc = run("generate", "--model", str(tiny_dir), "--prompt", "hi", "--rope-scaling", "dynamic")
    assert_clean_error(proc, "--rope-scaling dynamic needs --rope-factor")
    proc = run("info", "--model", str(tiny_dir), "--rope-scaling", "linear", "--rope-factor", "0.5")
    assert_clean_error(proc, "--rope-factor must be >= 1")
    proc = run("info", "--model", str(tiny_dir), "--rope-scaling", "longrope", "--rope-factor", "2")
    assert_clean_error(proc, "needs short_factor, long_factor", "--rope-config")


@pytest.mark.parametrize(
    "flags",
    [
        ["--rope-scaling", "yarn", "--rope-factor", "4", "--rope-original-max", "64"],
        ["--rope-scaling", "dynamic", "--rope-factor", "2", "--rope-original-max", "64"],
        [
            "--rope-config",
            json.dumps({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": LONG}),
            "--rope-factor",
            "4",
            "--rope-original-max",
            "64",
        ],  # fmt: skip
    ],
    ids=["yarn", "dynamic", "longrope"],
)
def test_convert_saves_the_scaling_and_transformers_rotates_the_same(tiny_dir, tmp_path, flags):
    from transformers import AutoModelForCausalLM

    import llamalab
    from llamalab.model_options import apply_rope_scaling

    out = tmp_path / "scaled"
    proc = run("convert", "--model", str(tiny_dir), "--out", str(out), *flags)
    assert proc.returncode == 0, proc.stderr
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = llamalab.load(str(out))
    direct = llamalab.load(str(tiny_dir))  # the flags on the unconverted model give the same rotation
    apply_rope_scaling(direct, ModelOptions.from_kwargs(**_flags_to_kwargs(flags)))
    assert ours.config.rope_scaling == direct.config.rope_scaling
    ids = torch.randint(0, ours.config.vocab_size, (1, 200))  # past L0 = 64: the scaled regime
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours.model(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(direct.model(ids), expected, atol=1e-5, rtol=1e-5)


def _flags_to_kwargs(flags: list[str]) -> dict:
    names = {"--rope-scaling": "rope_scaling", "--rope-factor": "rope_factor",
             "--rope-original-max": "rope_original_max", "--rope-config": "rope_config"}  # fmt: skip
    return {names[flags[i]]: flags[i + 1] for i in range(0, len(flags), 2)}


@pytest.mark.parametrize(
    "overrides",
    [  # L0 = 32 both times (transformers' dynamic NTK reads it from max_position_embeddings)
        dict(max_position_embeddings=32, rope_scaling=dict(rope_type="dynamic", factor=4.0)),
        dict(
            max_position_embeddings=128,
            rope_scaling=dict(
                rope_type="longrope",
                short_factor=[1.0] * 8,
                long_factor=LONG,
                original_max_position_embeddings=32,
            ),
        ),
    ],
    ids=["dynamic", "longrope"],
)
def test_length_dependent_rope_is_fixed_per_sequence_through_the_cache(overrides):
    # The cache is made for 90 tokens, past L0 = 32: chunked prefill that starts below L0 and token-by-token
    # decode all use the 90-token rotation, so they equal one forward pass over the 90 tokens.
    ours = ours_from_hf(hf_model(num_key_value_heads=2, **overrides))
    ids = torch.randint(0, 512, (1, 90))
    with torch.no_grad():
        full = ours(ids)[0]
        cache = DenseCache.for_model(ours.config, 90)
        parts = [ours(ids[:, :20], 0, cache)[0], ours(ids[:, 20:60], 20, cache)[0]]
        parts += [ours(ids[:, t : t + 1], t, cache)[0] for t in range(60, 90)]
        short = ours(ids[:, :20])[0]  # alone, 20 tokens are below L0: the short / unscaled rotation
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(short, full[:20], atol=1e-3)
