"""Parity with transformers' LlamaForCausalLM on tiny random configs, built from one state dict."""

import pytest
import torch

from llamalab.kv.dense import DenseCache
from tests.tiny import hf_model, ours_from_hf

CONFIGS = {
    "mha-untied": dict(),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(
        num_key_value_heads=1,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "linear-rope-headdim": dict(
        num_key_value_heads=2, head_dim=32, rope_scaling=dict(rope_type="linear", factor=2.0)
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_equal_transformers(name):
    hf = hf_model(**CONFIGS[name])
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 512, (2, 200))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied", "gqa-llama3-rope"])
def test_bf16_logits_match_transformers(name):
    hf = hf_model(dtype=torch.bfloat16, **CONFIGS[name])
    ours = ours_from_hf(hf, dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 96))
    with torch.no_grad():
        expected = hf(ids).logits.float()
        got = ours(ids).float()
    # Same op order as transformers, so bf16 rounding agrees to a few bf16 ulps of the logit scale.
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_rope_parameters_v5_spelling_equals_rope_scaling():
    from llamalab.model.config import ModelConfig

    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=64, intermediate_size=8)
    base.update(num_hidden_layers=1, num_attention_heads=4)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    v4 = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    v5 = ModelConfig.from_hf(
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    )
    assert (v4.rope_theta, v4.rope_scaling) == (v5.rope_theta, v5.rope_scaling)


@pytest.mark.parametrize("name", ["gqa-tied", "gqa-llama3-rope"])
def test_cached_prefill_and_decode_equal_full_forward(name):
    ours = ours_from_hf(hf_model(**CONFIGS[name]))
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        full = ours(ids)[0]
        cache = DenseCache.for_model(ours.config, 64)
        chunks = [ours(ids[:, :17], 0, cache)[0]]
        chunks.append(ours(ids[:, 17:30], 17, cache)[0])  # a chunk on top of the cache
        chunks += [ours(ids[:, t : t + 1], t, cache)[0] for t in range(30, 40)]  # token-by-token decode
    torch.testing.assert_close(torch.cat(chunks), full, atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_decode_like_single_rows():
    ours = ours_from_hf(hf_model(num_key_value_heads=2))
    a, b = torch.randint(0, 512, (1, 23)), torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        cache = DenseCache.for_model(ours.config, 64, max_batch=3)
        ours(a[:, :-1], 0, cache, rows=[2])
        ours(b[:, :-1], 0, cache, rows=[0])
        both = ours(torch.cat([a[:, -1:], b[:, -1:]]), [22, 8], cache, rows=[2, 0])[:, -1]
        alone_a = ours(a)[0, -1]
        alone_b = ours(b)[0, -1]
    torch.testing.assert_close(both[0], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone_b, atol=1e-5, rtol=1e-5)


def test_fused_projections_fall_back_when_a_module_is_swapped():
    hf = hf_model()
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ours(ids)  # the fused q/k/v weight is built from the original modules
        attn = ours.model.layers[0].self_attn
        swapped = torch.nn.Linear(64, 64, bias=False)
        swapped.weight.zero_()  # a different module under the same name: attention sees zero queries
        attn.q_proj = swapped
        after = ours(ids)
        hf.model.layers[0].self_attn.q_proj.weight.zero_()  # the same change in transformers
        expected = hf(ids).logits
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
