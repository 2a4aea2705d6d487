"""The fused native decode step (llamalab.model.fused_decode + kernels/decode_step.cpp) against the PyTorch path.

The PyTorch path is the reference: it is held to transformers by the parity tests, and the native step
follows it rounding for rounding in bf16 (only the order of fp32 summations differs), and in fp32 differs
only in summation order. Every test skips, naming
the reason, where the kernels are not supported, and fails where they should build and do not.
"""

import pytest
import torch

import llamalab.model.transformer as transformer
from llamalab.kv.dense import DenseCache
from llamalab.model import fused_decode
from llamalab.model.attention import register_attention_backend, sdpa_attention
from tests.decoding import decode
from tests.tiny import hf_model, ours_from_hf


@pytest.fixture(autouse=True)
def native(native_kernels):
    """Skip where the kernels are not supported, fail where they should work and do not (tests/conftest.py)."""


def tiny(dtype=torch.bfloat16, **overrides):
    return ours_from_hf(hf_model(dtype=dtype, **overrides), dtype=dtype)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=4),  # MHA, untied head
        dict(num_key_value_heads=2, tie_word_embeddings=True),  # GQA, tied head
        dict(num_key_value_heads=1, head_dim=32, num_attention_heads=4),  # MQA, head_dim 32
        dict(num_key_value_heads=2, head_dim=64),  # SmolLM2's and Llama's head sizes take the
        dict(num_key_value_heads=1, head_dim=128, num_attention_heads=2),  # register-sum path
        dict(
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),  # fmt: skip
    ],
)
def test_native_step_matches_the_pytorch_path_bf16(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, 512, (1, 40))
    ref, ref_cache = decode(model, ids, fused=False)
    got, got_cache = decode(model, ids, fused=True)
    # Keys and values written by the step: layer 0's come from the same embedding through the same norm,
    # GEMV and RoPE roundings, so they are equal; deeper layers inherit attention's summation-order noise.
    end = ids.shape[1]
    assert torch.equal(got_cache.k[0][:, :, :end], ref_cache.k[0][:, :, :end])
    assert torch.equal(got_cache.v[0][:, :, :end], ref_cache.v[0][:, :, :end])
    for layer in range(1, len(got_cache.k)):
        torch.testing.assert_close(
            got_cache.k[layer][:, :, :end], ref_cache.k[layer][:, :, :end], atol=3e-2, rtol=2e-2
        )
    # Logits to a bf16 rounding or two (2^-8 relative), and the same greedy choices.
    torch.testing.assert_close(got, ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kv_heads,head_dim", [(4, 16), (2, 64), (1, 24)])
def test_native_step_matches_the_pytorch_path_fp32(kv_heads, head_dim):
    model = tiny(
        torch.float32, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=kv_heads == 2
    )
    ids = torch.randint(0, 512, (1, 40))
    ref, ref_cache = decode(model, ids, fused=False)
    got, got_cache = decode(model, ids, fused=True)
    end = ids.shape[1]
    for layer in range(len(got_cache.k)):
        torch.testing.assert_close(got_cache.k[layer][:, :, :end], ref_cache.k[layer][:, :, :end])
        torch.testing.assert_close(got_cache.v[layer][:, :, :end], ref_cache.v[layer][:, :, :end])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # the parity tests' fp32 bar


def test_step_is_the_same_on_one_and_two_threads():
    model = tiny(num_key_value_heads=2)
    ids = torch.randint(0, 512, (1, 30))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = decode(model, ids, fused=True)
        torch.set_num_threads(2)
        two, _ = decode(model, ids, fused=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def batched_steps(model, prompts: list[torch.Tensor], steps: int, fused: bool, rows: list[int]):
    """Prefill each prompt into its cache row alone, then decode `steps` tokens for all rows together (each
    at its own position), feeding each row its own greedy token: the logits (steps, B, V)."""
    cache = DenseCache.for_model(model.config, 64, max_batch=4, dtype=model.model.embed_tokens.weight.dtype)
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        if not fused:
            mp.setattr(transformer, "fused_decode_logits", lambda *a: None)
        last = [
            int(model(p[None], 0, cache, rows=[r], last_only=True)[0, -1].argmax())
            for p, r in zip(prompts, rows)
        ]
        starts = [len(p) for p in prompts]
        out = []
        for _ in range(steps):
            logits = model(torch.tensor(last)[:, None], starts, cache, rows=rows)[:, -1]
            out.append(logits.float())
            last = logits.argmax(-1).tolist()
            starts = [s + 1 for s in starts]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_step_rows_equal_their_unbatched_steps(dtype):
    # Sequences of different lengths in non-contiguous cache rows: every row's logits are exactly those it
    # gets decoding alone (the weights are shared, the sums are the same), and agree with the PyTorch path.
    model = tiny(dtype, num_key_value_heads=2)
    prompts = [torch.randint(0, 512, (n,)) for n in (5, 17, 9)]
    rows = [2, 0, 3]
    together = batched_steps(model, prompts, 6, fused=True, rows=rows)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        alone = batched_steps(model, [p], 6, fused=True, rows=[r])
        assert torch.equal(together[:, b], alone[:, 0])
    reference = batched_steps(model, prompts, 6, fused=False, rows=rows)
    tol = 2e-2 * float(reference.abs().max()) if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(together, reference, atol=tol, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_repeated_cache_rows_take_the_pytorch_path():
    model = tiny()
    cache = DenseCache.for_model(model.config, 64, max_batch=2, dtype=torch.bfloat16)
    with torch.inference_mode():
        ids = torch.randint(0, 512, (2, 1))
        assert fused_decode.fused_decode_logits(model, ids, [3, 4], cache, [1, 1]) is None
        assert fused_decode.fused_decode_logits(model, ids, [3, 4], cache, [1, 0]).shape == (2, 1, 512)


# --- when the native step must stand aside ------------------------------------------------------------


def test_not_taken_for_fp16_or_with_gradients():
    ids = torch.randint(0, 512, (1, 20))
    decode(tiny().half(), ids, fused=False)  # the spy asserts the step declined
    model = tiny()
    cache = DenseCache.for_model(model.config, 64, dtype=torch.bfloat16)
    with torch.enable_grad():
        assert fused_decode.fused_decode_logits(model, ids[:, :1], [0], cache, [0]) is None


def test_not_taken_for_another_cache_or_a_position_beyond_it():
    model = tiny()
    ids = torch.randint(0, 512, (1, 1))

    class OtherCache(DenseCache):  # a KV method subclassing the dense cache keeps its own update
        pass

    other = OtherCache.for_model(model.config, 64, dtype=torch.bfloat16)
    dense = DenseCache.for_model(model.config, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert fused_decode.fused_decode_logits(model, ids, [0], other, [0]) is None
        assert fused_decode.fused_decode_logits(model, ids, [64], dense, [0]) is None
        assert fused_decode.fused_decode_logits(model, ids, [63], dense, [0]) is not None


def test_hooks_swaps_and_backends_send_steps_back_to_pytorch():
    model = tiny(num_key_value_heads=2)
    ids = torch.randint(0, 512, (1, 20))
    decode(model, ids, fused=True)  # builds and caches the plan

    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    decode(model, ids, fused=False)  # the hook must fire on every step, so the native step declines
    assert len(seen) == 1 + 8  # the prefill, then each step
    handle.remove()
    decode(model, ids, fused=True)

    backend = register_attention_backend("test_sdpa_copy")(lambda *a: sdpa_attention(*a))
    model.model.layers[0].self_attn.backend = backend
    decode(model, ids, fused=False)
    model.set_attention_backend("sdpa")
    decode(model, ids, fused=True)

    # A Linear swapped at the seam (as quantization and LoRA do) un-fuses q/k/v: the step declines.
    attn = model.model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features, bias=False).bfloat16()
    decode(model, ids, fused=False)


def test_dtype_round_trip_re_reads_the_weights():
    model = tiny(num_key_value_heads=2)
    ids = torch.randint(0, 512, (1, 20))
    before, _ = decode(model, ids, fused=True)
    model.half()
    decode(model, ids, fused=False)
    model.bfloat16()  # new storage for every weight: the fused q/k/v and gate/up tensors are stale
    model.fuse_projections()
    after, _ = decode(model, ids, fused=True)
    assert torch.equal(before, after)


def test_stale_fused_weights_are_not_used():
    model = tiny(num_key_value_heads=2)
    ids = torch.randint(0, 512, (1, 20))
    decode(model, ids, fused=True)
    model.float().bfloat16()  # storage replaced in place (param.data), no module registration
    decode(model, ids, fused=False)


@pytest.mark.slow
def test_default_model_fp32_greedy_text_identical_with_and_without_native_step():
    import llamalab

    llm = llamalab.load("smollm2-135m", dtype="fp32")
    prompt = "The history of Paris begins"
    fused = llm.generate(prompt, max_new_tokens=64, temperature=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformer, "fused_decode_logits", lambda *a: None)
        plain = llm.generate(prompt, max_new_tokens=64, temperature=0)
    assert fused == plain


@pytest.mark.slow
def test_default_model_bf16_step_agrees_with_the_pytorch_path():
    # bf16 logits carry noise of a few ulps whichever way they are summed, so a greedy text can part at a
    # near-tie (measured: both paths are equally far from fp32). Teacher-force the PyTorch path's own
    # greedy continuation through both and compare step by step.
    import llamalab

    llm = llamalab.load("smollm2-135m", dtype="bf16")
    prompt = llm.encode("The history of Paris begins", add_special_tokens=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformer, "fused_decode_logits", lambda *a: None)
        continuation = llm.encode(
            llm.generate(prompt, max_new_tokens=64, temperature=0), add_special_tokens=False
        )
    ids = torch.tensor([prompt + continuation])
    ref, _ = decode(llm.model, ids, fused=False, steps=len(continuation))
    got, _ = decode(llm.model, ids, fused=True, steps=len(continuation))
    assert (got - ref).abs().max() <= 1.0  # logits of magnitude ~20, bf16 ulp 0.125
    top2 = ref.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5  # steps whose choice is not within bf16 noise
    assert clear.sum() >= len(continuation) // 2
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
