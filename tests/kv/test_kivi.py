"""KIVI (arXiv 2402.02750): round-trip error bounds of its two quantizers, really packed storage, and the
cache against a slow reference (tests/kv/references.py) through chunked prefill, a batch of rows at
different lengths, decoding and chunked perplexity."""

from __future__ import annotations

import pytest
import torch

import llamalab
from llamalab.errors import LlamalabError
from llamalab.eval.perplexity import perplexity
from llamalab.kv.kivi import KiviStore, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from llamalab.kv.registry import CacheSpec
from llamalab.model_options import ModelOptions
from tests.kv.generation import run_rows
from tests.kv.test_seam import TEXT

SETTINGS = dict(group_size=8, args={"residual": "16"})  # the tiny model's heads are 16 wide


def _outliers(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 20  # an outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_round_trip_within_half_a_step_per_channel_group(bits):
    k = _outliers((2, 3, 64, 16))  # (B, H, T, D), groups of 8 tokens
    codes, scale, mn = quantize_keys(k, bits, 8)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.shape == mn.shape == (2, 3, 8, 16) and scale.dtype == torch.float16
    back = dequantize_keys(codes, scale, mn, 8, torch.float32)
    err = (back - k).abs().reshape(2, 3, 8, 8, 16)
    step = scale.float()[:, :, :, None, :]
    # half a quantization step of that (group, channel), plus the fp16 rounding of the stored minimum
    slack = 1e-3 * mn.float().abs()[:, :, :, None, :] + 1e-6
    assert bool((err <= step / 2 + slack).all())
    # per channel: an outlier channel's large step stays in its own groups
    assert float(scale[..., 3].float().mean()) > 10 * float(scale[..., 0].float().mean())


@pytest.mark.parametrize("bits", [2, 4])
def test_values_round_trip_within_half_a_step_per_token_group(bits):
    v = _outliers((2, 3, 10, 16), seed=1)
    codes, scale, mn = quantize_values(v, bits, 8)
    assert scale.shape == (2, 3, 10, 2)
    back = dequantize_values(codes, scale, mn, 8, torch.float32)
    err = (back - v).abs().reshape(2, 3, 10, 2, 8)
    slack = 1e-3 * mn.float().abs()[..., None] + 1e-6
    assert bool((err <= scale.float()[..., None] / 2 + slack).all())
    const = torch.full((1, 1, 1, 16), 0.75)  # a constant group is exact (zero step)
    assert torch.equal(dequantize_values(*quantize_values(const, bits, 8), 8, torch.float32), const)


def test_storage_is_packed_and_nbytes_is_its_accounting(tiny_dir):
    config = llamalab.load(str(tiny_dir)).model.config
    L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    for bits in (2, 4):
        cache = CacheSpec("kivi", bits, **SETTINGS).make(config, 256, 3, torch.float32, "cpu")
        codes = 2 * 3 * H * 256 * D * bits // 8  # keys and values, bits/8 bytes per value
        scales = 3 * H * (2 * (256 // 8) * D + 2 * 256 * (D // 8)) * 2  # fp16 scale + minimum per group
        residual = 2 * 3 * H * 16 * D * 4
        assert cache.nbytes() == L * (codes + scales + residual)
        held = sum(
            t.numel() * t.element_size() for s in cache.layers for t in [*s.tensors(), s.k_res, s.v_res]
        )
        assert cache.nbytes() == held
        assert cache.layers[0].k_codes.shape[-1] == D * bits // 8


def test_a_short_rows_padding_is_finite_even_over_uninitialised_memory(monkeypatch):
    """Rows of one read are padded to the longest; attention masks the padding but still multiplies its zero
    weights by it, so NaN there (uninitialised memory) would make the short row's output NaN."""
    fresh = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):  # what uninitialised memory may hold
        t = fresh(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    store = KiviStore(2, 16, 64, 2, 2, 8, 16, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    store.write([0], torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g))
    store.write([1], torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g))
    keys, values = store.read([0, 1])
    assert keys.shape == values.shape == (2, 2, 40, 16)
    assert bool(keys.isfinite().all()) and bool(values.isfinite().all())
    assert not keys[1, :, 5:].any() and not values[1, :, 5:].any()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return llamalab.load(str(tiny_dir))


def _generate(llm, spec, prompts):
    return run_rows(llm, spec, prompts, n=24, max_len=128)


@pytest.mark.parametrize("bits", [2, 4])
def test_generation_matches_the_reference_in_a_batch_of_rows_at_different_lengths(
    llm, bits, kernels_expected
):
    ids = llm.encode(TEXT)
    prompts = [ids[:45], ids[:9]]  # 45: keys quantize a prefix in the first chunks; 9: decode does it
    spec = CacheSpec("kivi", bits, **SETTINGS)
    got, engine = _generate(llm, spec, prompts)
    want, _ = _generate(llm, CacheSpec("test-reference-kivi", bits, **SETTINGS), prompts)
    assert got == want
    alone = [_generate(llm, spec, [p])[0][0] for p in prompts]
    assert got == alone  # a row's result does not depend on the other rows
    # decode reads the packed cache in the native step where the kernels run (test_kivi_native.py)
    assert (engine.decode_path == "native") == kernels_expected
    dense, _ = _generate(llm, CacheSpec("dense"), prompts)
    if bits == 2:
        assert got != dense  # 2 bits change what this random model generates: the quantized past is read


def test_chunked_perplexity_reads_the_quantized_past(llm):
    tokens = llm.encode(TEXT * 3)
    opts = ModelOptions(kv="kivi", kv_bits=2, kv_group_size=8, kv_args={"residual": "16"})
    got = perplexity(llm, tokens, 96, opts=opts, chunk_size=8, progress=False).ppl
    ref_opts = ModelOptions(kv="test-reference-kivi", kv_bits=2, kv_group_size=8, kv_args={"residual": "16"})
    want = perplexity(llm, tokens, 96, opts=ref_opts, chunk_size=8, progress=False).ppl
    dense = perplexity(llm, tokens, 96, progress=False).ppl
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - dense) > 10 * 1e-5 * dense  # ten times the tolerance above: the quantization is read


@pytest.mark.parametrize(
    "spec, message",
    [
        (CacheSpec("kivi", 3), "--kv-bits 3 is not supported by --kv kivi; use 2 or 4"),
        (CacheSpec("kivi", 2, 32), "--kv-group-size 32 must divide the head dimension 16"),
        (CacheSpec("kivi", 2, 8, {"residual": "12"}), "residual=12 must be a multiple of --kv-group-size 8"),
        (CacheSpec("kivi", 2, 8, {"window": "4"}), "--kv-arg window do.* not apply to --kv kivi"),
        (CacheSpec("kivi", 2, 8, predictors="p.safetensors"), "--kv-predictors do.* not apply"),
    ],
)
def test_bad_settings_fail_with_one_line(llm, spec, message):
    with pytest.raises(LlamalabError, match=message):
        spec.make(llm.model.config, 64, 1, torch.float32, "cpu")
