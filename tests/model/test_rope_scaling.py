"""Every RoPE scaling type against transformers' own implementation: the frequencies and attention factor of
`ROPE_INIT_FUNCTIONS`, and whole-model logits on tiny random LLaMAs read from both config spellings (v4
`rope_scaling` + top-level `rope_theta`, v5 `rope_parameters`)."""

from __future__ import annotations

import pytest
import torch

from llamalab.errors import CheckpointError
from llamalab.model.build import build_model
from llamalab.model.config import ModelConfig
from llamalab.model.rope import check_scaling, critical_pair, rope_frequencies
from tests.tiny import hf_model

PAIRS = 8  # head_dim 16 in the tiny configs
LONG = [1.0, 1.1, 1.3, 1.8, 2.6, 3.9, 4.4, 5.0]
SHORT = [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.4]

# name -> (LlamaConfig overrides, sequence lengths to run)
CASES = {
    "linear": (dict(rope_scaling=dict(rope_type="linear", factor=2.0)), [200]),
    # L0 = max_position_embeddings for transformers' dynamic NTK: 64, so 200 regrows the base and 40 does not.
    "dynamic": (
        dict(max_position_embeddings=64, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
        [40, 200],
    ),
    "yarn": (
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
        [200],
    ),
    "yarn-betas-untruncated": (
        dict(
            rope_scaling=dict(
                rope_type="yarn",
                factor=3.0,
                original_max_position_embeddings=80,
                beta_fast=16,
                beta_slow=2,
                truncate=False,
            )
        ),
        [150],
    ),
    "yarn-deepseek-mscale": (
        dict(
            rope_scaling=dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=64,
                mscale=1.0,
                mscale_all_dim=0.8,
            )
        ),
        [150],
    ),
    "yarn-attention-factor": (
        dict(
            rope_scaling=dict(
                rope_type="yarn", factor=4.0, original_max_position_embeddings=64, attention_factor=1.3
            )
        ),
        [150],
    ),
    # factor derived by transformers from max_position_embeddings / original: 256 / 64.
    "longrope": (
        dict(
            rope_scaling=dict(
                rope_type="longrope",
                short_factor=SHORT,
                long_factor=LONG,
                original_max_position_embeddings=64,
            )
        ),
        [50, 200],
    ),
    "longrope-factor": (
        dict(
            rope_scaling=dict(
                rope_type="longrope",
                short_factor=SHORT,
                long_factor=LONG,
                factor=8.0,
                original_max_position_embeddings=64,
            )
        ),
        [60, 120],
    ),
    "llama3": (
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
        [200],
    ),
}


def _spellings(hf) -> dict[str, dict]:
    """The model's config.json in transformers' v5 spelling and rewritten in the v4 one."""
    v5 = hf.config.to_dict()
    params = dict(v5["rope_parameters"])
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = params.pop("rope_theta")
    v4["rope_scaling"] = {"type" if "type" in v5 else "rope_type": params.pop("rope_type"), **params}
    return {"v4": v4, "v5": v5}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers_for_both_spellings(name):
    overrides, lengths = CASES[name]
    hf = hf_model(num_key_value_heads=2, **overrides)
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    for spelling, cfg in _spellings(hf).items():
        ours = build_model(ModelConfig.from_hf({**cfg, "architectures": ["LlamaForCausalLM"]}), state)
        for T in lengths:
            ids = torch.randint(0, 512, (1, T))
            with torch.no_grad():
                expected = hf(ids).logits
                got = ours(ids)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{name} {spelling} T={T}")


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_equal_rope_init_functions(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.tiny import BASE

    overrides, lengths = CASES[name]
    hf_cfg = LlamaConfig(**{**BASE, **overrides})
    ours = ModelConfig.from_hf({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    rope_type = hf_cfg.rope_parameters["rope_type"]
    # Without a length transformers takes its max_position_embeddings, we our context: compare at lengths.
    for T in [64, 65, *lengths]:
        expected, expected_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu", T)
        got, factor = rope_frequencies(ours, T)
        torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)
        assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_config_round_trips_through_transformers_semantics():
    # dynamic: transformers' L0 is max_position_embeddings; ours is explicit and the context is L0 x factor.
    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    dyn = ModelConfig.from_hf(
        {**base, "max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 4.0}}
    )
    assert (
        dyn.rope_scaling["original_max_position_embeddings"] == 4096 and dyn.max_position_embeddings == 16384
    )
    hf = dyn.to_hf()
    assert hf["max_position_embeddings"] == 4096 and hf["rope_scaling"] == {
        "rope_type": "dynamic",
        "factor": 4.0,
    }
    assert hf["rope_parameters"]["rope_theta"] == 10000.0
    # Phi-3: a top-level original_max_position_embeddings wins, factor = max_pos / original is fixed.
    phi = ModelConfig.from_hf(
        {
            **base,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        }
    )
    assert phi.rope_scaling["original_max_position_embeddings"] == 4096 and phi.rope_scaling["factor"] == 32
    back = ModelConfig.from_hf({**base, **phi.to_hf()})
    assert back.rope_scaling == phi.rope_scaling and back.max_position_embeddings == 131072
    # Qwen2.5-style yarn: max_position_embeddings = L0, so the context is what the factor supports.
    qwen = ModelConfig.from_hf(
        {
            **base,
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        }
    )
    assert qwen.max_position_embeddings == 131072


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "nosuch", "factor": 2.0}, "'nosuch' is not supported; known types: default, dynamic"),
        ({"rope_type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
        ({"rope_type": "yarn"}, "'yarn' needs factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "'llama3' needs low_freq_factor, high_freq_factor"),
        ({"rope_type": "longrope", "long_factor": LONG}, "'longrope' needs short_factor"),
        (
            {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG[:5]},
            "one factor per frequency",
        ),
        ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": [0.0] * 8}, "non-positive"),
    ],
)
def test_bad_scaling_is_one_clear_error(scaling, message):
    with pytest.raises(CheckpointError, match=message):
        check_scaling(scaling, head_dim=16)


def test_critical_pair_of_known_models():
    # LongRoPE2's theoretical critical dimension d_tcd = 2 * pair: LLaMA3-8B 70, LLaMA2-7B 92, SmolLM2 40.
    assert 2 * critical_pair(128, 5e5, 8192) == 70
    assert 2 * critical_pair(128, 1e4, 4096) == 92
    assert 2 * critical_pair(64, 1e5, 8192) == 40


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_default_model_with_yarn_and_longrope_equals_transformers(kind, tmp_path, alice_text):
    # L0 = 256 (a legal setting) puts 400 tokens of real text in the scaled regime at a small cost.
    import json

    from transformers import AutoModelForCausalLM

    import llamalab
    from llamalab.convert import convert_to_hf
    from llamalab.model_options import ModelOptions, load_model

    extra = {}
    if kind == "longrope":
        long = [round(4.0 ** min(i / 20, 1.0) + 0.05 * max(i - 20, 0), 3) for i in range(32)]
        extra = {
            "rope_config": json.dumps(
                {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": long}
            )
        }
    opts = ModelOptions(rope_scaling=kind, rope_factor=4.0, rope_original_max=256, **extra)
    convert_to_hf("smollm2-135m", tmp_path / "m", "fp32", opts)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ours = load_model(opts)
    saved = llamalab.load(str(tmp_path / "m"))
    assert (
        saved.config.rope_scaling == ours.config.rope_scaling and saved.config.max_position_embeddings == 1024
    )
    ids = torch.tensor([ours.encode(alice_text[:3000])[:400]])
    with torch.no_grad():
        expected = hf(ids).logits[0]
        got = ours.model(ids)[0]
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99
