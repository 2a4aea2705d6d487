"""The native decode step over a KIVI cache (kernels/kivi_layout.cpp) against KIVI's PyTorch path
(llamalab/kv/kivi.py), which the reference tests hold to the paper's mechanism (tests/kv/test_kivi.py).

The step dequantizes the packed codes inside attention and quantizes what leaves the residual windows itself,
so a decode that crosses both (keys quantized every R tokens, values from the R+1-th on) checks reading and
writing: the cache each path leaves behind, and the logits of every step. Skips where the kernels are not
supported, fails where they should build and do not.
"""

from __future__ import annotations

import pytest
import torch

from llamalab.generate.native_step import NativeDecoder
from llamalab.kv.registry import CacheSpec
from tests.decoding import decode
from tests.tiny import hf_model, ours_from_hf


@pytest.fixture(autouse=True)
def native(native_kernels):
    """Skip where the kernels are not supported, fail where they should work and do not (tests/conftest.py)."""


def _decode(model, spec, ids, prefill, native, rows=(0,)):
    """Prefill `ids[:, :prefill]` into a KIVI cache in chunks of 8 (so keys are quantized on the way), then
    decode the rest teacher forced through the native step or the PyTorch path (tests/decoding.py)."""
    dtype = model.model.norm.weight.dtype
    cache = spec.make(model.config, ids.shape[1] + 8, max(rows) + 1, dtype, "cpu")
    return decode(model, ids, native, ids.shape[1] - prefill, cache, rows, chunk=8)


def _held(store, row: int) -> list[torch.Tensor]:
    """What a store holds for `row`: quantized keys and values, their scales and minimums, and the live
    slots of the two windows (slots past them keep stale tokens, which neither path reads)."""
    n, nk, nv, R, G = store.length[row], store.nk[row], store.nv[row], store.residual, store.group
    return [
        store.k_codes[row, :, :nk], store.k_scale[row, :, : nk // G], store.k_min[row, :, : nk // G],
        store.v_codes[row, :, :nv], store.v_scale[row, :, :nv], store.v_min[row, :, :nv],
        store.k_res[row, :, : n - nk], store.v_res[row, :, R - (n - nv) :],
    ]  # fmt: skip


def _same_state(got, want, rows, layers):
    for lg, lw in zip(got.layers[:layers], want.layers[:layers]):
        assert (lg.length, lg.nk, lg.nv) == (lw.length, lw.nk, lw.nv)
        for r in rows:
            for a, b in zip(_held(lg, r), _held(lw, r)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(
    "group,residual,kv_heads,head_dim",
    [(8, 16, 2, 16), (32, 32, 1, 64), (16, 32, 2, 48)],  # two value groups; one (SmolLM2's heads); three
)
def test_native_kivi_decode_matches_the_pytorch_path_fp32(bits, group, residual, kv_heads, head_dim):
    model = ours_from_hf(hf_model(num_key_value_heads=kv_heads, head_dim=head_dim, num_attention_heads=4))
    spec = CacheSpec("kivi", bits, group_size=group, args={"residual": str(residual)})
    ids = torch.randint(0, 512, (1, 2 * residual + 12))
    prefill = residual // 2 + 3  # decode quantizes keys twice and values from the first overflow on
    got, got_cache = _decode(model, spec, ids, prefill, native=True)
    want, want_cache = _decode(model, spec, ids, prefill, native=False)
    # fp32: only summation order differs, so every step's logits agree to rounding, over a past read in
    # quantized and full-precision parts alike
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    last, ref = got_cache.layers[-1], want_cache.layers[-1]
    assert (last.length, last.nk, last.nv) == (ref.length, ref.nk, ref.nv)
    assert last.nk[0] == 2 * residual and last.nv[0] > 0
    for a, b in zip(_held(last, 0), _held(ref, 0)):  # the stores agree to rounding too (a code may flip
        close = torch.isclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)  # where a value sits on a tie)
        assert float(close.float().mean()) > 0.99


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rows", [(0,), (2, 0)])
def test_native_kivi_decode_matches_the_pytorch_path_bf16(bits, rows):
    model = ours_from_hf(hf_model(num_key_value_heads=2, head_dim=32), dtype=torch.bfloat16)
    spec = CacheSpec("kivi", bits, group_size=8, args={"residual": "16"})
    ids = torch.randint(0, 512, (len(rows), 48))
    got, got_cache = _decode(model, spec, ids, 11, native=True, rows=rows)
    want, want_cache = _decode(model, spec, ids, 11, native=False, rows=rows)
    if len(rows) == 1:
        # one sequence: the PyTorch path's projections run the same GEMV kernel, and every dequantized value,
        # RoPE and output is rounded as it rounds them, so layer 0's store is bit-equal. (A batch's PyTorch
        # projections are a GEMM whose order of summation, and so a rare bf16 rounding, is the CPU's.)
        _same_state(got_cache, want_cache, rows=rows, layers=1)
    # the logits differ by summation order through the layers
    assert float((got - want).abs().amax()) < 0.05 * float(want.abs().amax())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


def test_the_native_step_declines_a_row_written_out_of_order():
    model = ours_from_hf(hf_model(num_key_value_heads=2))
    spec = CacheSpec("kivi", 2, group_size=8, args={"residual": "16"})
    cache = spec.make(model.config, 64, 1, torch.float32, "cpu")
    with torch.inference_mode():
        model(torch.randint(0, 512, (1, 5)), [0], cache, rows=[0])
        step, why = NativeDecoder.create(model, cache)
        assert why == "native"
        assert step(torch.tensor([[3]]), [7], [0]) is None  # the PyTorch path says what is wrong
        assert step(torch.tensor([[3]]), [5], [0]) is not None
    assert cache.layers[0].length[0] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_past_is_split_between_workers_and_merged(dtype):
    """Past a few hundred positions each (sequence, kv head) is split into runs whose softmax sums are merged
    (kivi_layout.cpp); the split changes only the order of summation."""
    model = ours_from_hf(hf_model(num_key_value_heads=1, head_dim=64, num_attention_heads=2), dtype=dtype)
    spec = CacheSpec("kivi", 2, group_size=32, args={"residual": "128"})
    ids = torch.randint(0, 512, (1, 1100))
    got, got_cache = _decode(model, spec, ids, 1090, native=True)
    want, want_cache = _decode(model, spec, ids, 1090, native=False)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        _same_state(got_cache, want_cache, rows=(0,), layers=1)
        assert float((got - want).abs().amax()) < 0.05 * float(want.abs().amax())
