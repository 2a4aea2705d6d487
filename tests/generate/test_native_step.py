"""The native decode step (llamalab.generate.native_step + kernels/decode_step.cpp) against the PyTorch path,
and the engine's choice between them.

The PyTorch path is the reference: it is held to transformers by the parity tests. In fp32 the native step
differs from it only in summation order. In bf16 it follows it rounding for rounding, but the PyTorch path's
own bf16 rounding depends on the CPU (oneDNN with or without AMX), so both are bounded by their distance
from an fp32 reference (tests/decoding.py). Every test skips, naming the reason, where the kernels are
not supported, and fails where they should build and do not.
"""

import pytest
import torch

from llamalab.generate.native_step import NativeDecoder
from llamalab.kv.dense import DenseCache
from llamalab.model.attention import register_attention_backend, sdpa_attention
from llamalab.model.linear import Linear
from tests.decoding import assert_bf16_within_pytorch_error, decode
from tests.tiny import hf_model, ours_from_hf


@pytest.fixture(autouse=True)
def native(native_kernels):
    """Skip where the kernels are not supported, fail where they should work and do not (tests/conftest.py)."""


def tiny(dtype=torch.bfloat16, **overrides):
    return ours_from_hf(hf_model(dtype=dtype, **overrides), dtype=dtype)


def declined(model, cache=None) -> str:
    """Why the native step declines `model` (fails the test when it takes it)."""
    cache = cache or DenseCache.for_model(model.config, 64, dtype=model.model.norm.weight.dtype)
    step, why = NativeDecoder.create(model, cache)
    assert step is None, "the native step took a model it must decline"
    return why


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
@pytest.mark.parametrize("fused", [False, True])
def test_native_step_matches_the_pytorch_path_bf16(overrides, fused):
    model = tiny(**overrides)
    if fused:  # the inference layout `llamalab.load` gives: q/k/v and gate/up as row blocks of one weight
        model.fuse()
    ids = torch.randint(0, 512, (1, 40))
    _, ref_cache = decode(model, ids, native=False)
    got, got_cache = decode(model, ids, native=True)
    # Keys and values written by the step: layer 0's come from the same embedding through the same norm,
    # GEMV and RoPE roundings, so they are equal; deeper layers inherit attention's summation-order noise.
    end = ids.shape[1]
    assert torch.equal(got_cache.k[0][:, :, :end], ref_cache.k[0][:, :, :end])
    assert torch.equal(got_cache.v[0][:, :, :end], ref_cache.v[0][:, :, :end])
    assert_bf16_within_pytorch_error(model, ids, got)


@pytest.mark.parametrize("kv_heads,head_dim", [(4, 16), (2, 64), (1, 24)])
def test_native_step_matches_the_pytorch_path_fp32(kv_heads, head_dim):
    model = tiny(
        torch.float32, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=kv_heads == 2
    )
    ids = torch.randint(0, 512, (1, 40))
    ref, ref_cache = decode(model, ids, native=False)
    got, got_cache = decode(model, ids, native=True)
    end = ids.shape[1]
    for layer in range(len(got_cache.k)):
        torch.testing.assert_close(got_cache.k[layer][:, :, :end], ref_cache.k[layer][:, :, :end])
        torch.testing.assert_close(got_cache.v[layer][:, :, :end], ref_cache.v[layer][:, :, :end])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # the parity tests' fp32 bar


@pytest.mark.parametrize("quantized", [False, True])
def test_step_is_the_same_on_one_and_two_threads(quantized):
    # The workers split every product by rows and attention by heads (decode_step.cpp): a row's sums do not
    # depend on who computes it. A batch of 3 in scattered rows, dense or int4 on the integer path.
    model = tiny(num_key_value_heads=2)
    if quantized:
        from tests.quant.test_native_kernels import quantize_projections

        quantize_projections(model, 4, 32)
    prompts = [torch.randint(0, 512, (n,)) for n in (5, 17, 9)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batched_steps(model, prompts, 4, native=True, rows=[2, 0, 3])
        torch.set_num_threads(2)
        two = batched_steps(model, prompts, 4, native=True, rows=[2, 0, 3])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def batched_steps(model, prompts: list[torch.Tensor], steps: int, native: bool, rows: list[int]):
    """Prefill each prompt into its cache row alone, then decode `steps` tokens for all rows together (each
    at its own position), feeding each row its own greedy token: the logits (steps, B, V)."""
    cache = DenseCache.for_model(model.config, 64, max_batch=4, dtype=model.model.norm.weight.dtype)
    step = NativeDecoder.create(model, cache)[0] if native else None
    with torch.inference_mode():
        last = [
            int(model(p[None], 0, cache, rows=[r], last_only=True)[0, -1].argmax())
            for p, r in zip(prompts, rows)
        ]
        starts = [len(p) for p in prompts]
        out = []
        for _ in range(steps):
            tokens = torch.tensor(last)[:, None]
            logits = step(tokens, starts, rows) if native else model(tokens, starts, cache, rows=rows)
            out.append(logits[:, -1].float())
            last = logits[:, -1].argmax(-1).tolist()
            starts = [s + 1 for s in starts]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_step_rows_equal_their_unbatched_steps(dtype):
    # Sequences of different lengths in non-contiguous cache rows: every row's logits are exactly those it
    # gets decoding alone (the weights are shared, the sums are the same), and agree with the PyTorch path.
    model = tiny(dtype, num_key_value_heads=2)
    prompts = [torch.randint(0, 512, (n,)) for n in (5, 17, 9)]
    rows = [2, 0, 3]
    together = batched_steps(model, prompts, 6, native=True, rows=rows)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        alone = batched_steps(model, [p], 6, native=True, rows=[r])
        assert torch.equal(together[:, b], alone[:, 0])
    if dtype == torch.float32:
        reference = batched_steps(model, prompts, 6, native=False, rows=rows)
        torch.testing.assert_close(together, reference, atol=1e-5, rtol=1e-5)


def test_repeated_cache_rows_and_positions_beyond_the_cache_take_the_pytorch_path():
    model = tiny()
    cache = DenseCache.for_model(model.config, 64, max_batch=2, dtype=torch.bfloat16)
    step, _ = NativeDecoder.create(model, cache)
    with torch.inference_mode():
        ids = torch.randint(0, 512, (2, 1))
        assert step(ids, [3, 4], [1, 1]) is None
        assert step(ids, [3, 4], [1, 0]).shape == (2, 1, 512)
        assert step(ids[:1], [64], [0]) is None  # the PyTorch path raises the context error
        assert step(ids[:1], [63], [0]) is not None
    with torch.enable_grad():
        assert step(ids[:1], [0], [0]) is None


# --- when the native step must stand aside ------------------------------------------------------------


def test_declines_fp16_other_caches_swapped_modules_and_other_backends():
    assert "bf16/fp32" in declined(tiny().half())
    model = tiny(num_key_value_heads=2)

    class OtherCache(DenseCache):  # a KV method that stores differently keeps its own update
        def update(self, layer, k, v, rows, starts):
            return super().update(layer, k, v, rows, starts)

    assert "not in a layout the native step reads" in declined(
        model, OtherCache.for_model(model.config, 64, dtype=torch.bfloat16)
    )

    backend = register_attention_backend("test_sdpa_copy")(lambda *a: sdpa_attention(*a))
    model.model.layers[0].self_attn.backend = backend
    assert "block 0" in declined(model)
    model.set_attention_backend("sdpa")

    class LoRALike(Linear):  # a module at the Linear-swap seam that computes something else
        def forward(self, x):
            return super().forward(x) * 2

    attn = model.model.layers[1].self_attn
    swapped = LoRALike(attn.k_proj.in_features, attn.k_proj.out_features, bias=False).bfloat16()
    attn.k_proj = swapped
    assert "projection of block 1" in declined(model)


def test_the_engine_says_which_path_it_takes_and_hooks_run_without_the_native_step():
    from llamalab.api import LLM
    from llamalab.io.load import Checkpoint
    from llamalab.io.tokenizer import Tokenizer
    from tests.tiny import tiny_bpe

    tok = Tokenizer(tiny_bpe())
    model = tiny(vocab_size=tok.vocab_size, num_key_value_heads=2)
    llm = LLM(model, Checkpoint(model.config, {}, tok, {}, source=None, format="test"), "tiny")
    assert llm.engine().decode_path == "native"
    assert llm.engine(native=False).decode_path.startswith("pytorch")
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    engine = llm.engine(native=False)
    list(engine.run([tok.encode("Alice was")], [llm.sampling(max_new_tokens=5, ignore_eos=True)]))
    handle.remove()
    assert seen[1:] == [1, 1, 1, 1]  # the prefill, then every decode step ran the module


def test_a_cast_model_is_read_afresh_by_a_new_decoder():
    model = tiny(num_key_value_heads=2)
    ids = torch.randint(0, 512, (1, 20))
    before, _ = decode(model, ids, native=True)
    model.float()
    model.bfloat16()  # new storage for every weight
    after, _ = decode(model, ids, native=True)
    assert torch.equal(before, after)


@pytest.mark.slow
def test_default_model_fp32_greedy_text_identical_with_and_without_native_step():
    import llamalab

    llm = llamalab.load("smollm2-135m", dtype="fp32")
    prompt = llm.encode("The history of Paris begins")
    params = [llm.sampling(max_new_tokens=64)]
    native = [e.seq for e in llm.engine(max_len=128).run([prompt], params)][-1].output_ids
    plain = [e.seq for e in llm.engine(max_len=128, native=False).run([prompt], params)][-1].output_ids
    assert native == plain


@pytest.mark.slow
def test_default_model_bf16_step_agrees_with_the_pytorch_path():
    # bf16 logits carry noise of a few ulps whichever way they are summed, so a greedy text can part at a
    # near-tie. Teacher-force one continuation through both paths and an fp32 copy, step by step.
    import llamalab

    llm = llamalab.load("smollm2-135m", dtype="bf16")
    prompt = llm.encode("The history of Paris begins", add_special_tokens=False)
    continuation = llm.encode(llm.generate(prompt, max_new_tokens=64), add_special_tokens=False)
    ids = torch.tensor([prompt + continuation])
    got, _ = decode(llm.model, ids, native=True, steps=len(continuation))
    assert_bf16_within_pytorch_error(llm.model, ids, got, steps=len(continuation))
