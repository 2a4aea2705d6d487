"""The native int8/int4 kernels (kernels/qgemm.h, quant_linear.cpp) and the native decode step on quantized
models, against slow references: the dequantized weight written out from the codes, and the PyTorch path.

Every test skips, naming the reason, where the native kernels are not supported, and fails where they should
build and do not (tests/conftest.py, `native_kernels`).
"""

import pytest
import torch

from llamalab import kernels
from llamalab.generate.native_step import NativeDecoder
from llamalab.kv.dense import DenseCache
from llamalab.model.modules import get_module, set_module
from llamalab.quant.base import UniformQuantLinear
from llamalab.quant.quantizer import group_affine
from tests.bf16_reference import assert_bf16_as_close_as_pytorch, pytorch_fp32_and_bf16
from tests.decoding import assert_bf16_within_pytorch_error, decode
from tests.tiny import hf_model, ours_from_hf


@pytest.fixture(autouse=True)
def native(native_kernels):
    """Skip where the kernels are not supported, fail where they should work and do not (tests/conftest.py)."""


@pytest.fixture
def exact_quant():
    """The exact path: these tests hold the kernels to the dequantized weight (the integer path, 8-bit
    activations, is tested against its own reference in test_integer_path.py)."""
    with kernels.exact_quant():
        yield


def reference_weight(codes, scales, zeros, group) -> torch.Tensor:
    """W[n, k] = scale[n, k // group] * (code[n, k] - zero[n, k // group]), one element at a time in fp32."""
    N, K = codes.shape
    w = torch.empty(N, K)
    for n in range(N):
        for k in range(K):
            g = k // group
            w[n, k] = scales[n, g] * (float(codes[n, k]) - zeros[n, g])
    return w


def random_module(bits, group, out_f=20, in_f=96, perm=False, bias=False):
    w = torch.randn(out_f, in_f)
    p = torch.randperm(in_f) if perm else None
    q, s, z = group_affine(w if p is None else w[:, p], bits, group)
    b = torch.randn(out_f) if bias else None
    return UniformQuantLinear.from_codes(q, s, z, bits, group, b, p), q, s, z, p


@pytest.mark.parametrize("bits,group", [(4, 32), (4, -1), (8, -1), (8, 32), (4, 64)])
@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_quant_matmul_matches_the_dequantized_weight(bits, group, rows):
    m, q, s, z, _ = random_module(bits, group, out_f=21, in_f=128)  # 21 rows: a 4-row tail of 1
    w = reference_weight(q, s, z, 128 if group == -1 else group)
    x = torch.randn(rows, 128)
    y = kernels.quant_matmul()(x, m.qweight, m.scales, m.qzeros, torch.empty(0, dtype=torch.int32), False)
    # fp32: the same products, summed in another order
    torch.testing.assert_close(y, x @ w.T, atol=1e-5 * float((x.abs() @ w.abs().T).max()), rtol=1e-5)
    yb = kernels.quant_matmul()(
        x.bfloat16(), m.qweight, m.scales, m.qzeros, torch.empty(0, dtype=torch.int32), False
    )
    # bf16 activations are exact in fp32: the fp32 sum (in another order), rounded once to bf16 (at most half an
    # ulp: 2^-8 relative, bf16 having 8 significant bits). Near zero the order alone matters, as in fp32 above.
    xb = x.bfloat16().float()
    order = 1e-5 * float((xb.abs() @ w.abs().T).max())
    torch.testing.assert_close(yb.float(), xb @ w.T, atol=order, rtol=2**-8)


def test_act_order_permutation_and_batch_invariance():
    m, q, s, z, p = random_module(4, 32, out_f=12, in_f=96, perm=True)
    w = reference_weight(q, s, z, 32)[:, torch.argsort(p)]  # columns back in input order
    x = torch.randn(7, 96)
    y = kernels.quant_matmul()(x, m.qweight, m.scales, m.qzeros, m.perm, False)
    torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)
    for i in range(7):  # each row alone sums in the same tiles and order as in the batch
        alone = kernels.quant_matmul()(x[i : i + 1], m.qweight, m.scales, m.qzeros, m.perm, False)
        assert torch.equal(alone[0], y[i])


@pytest.mark.parametrize("bits,group", [(4, 32), (8, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_exact(bits, group, dtype):
    m, q, s, z, _ = random_module(bits, group)
    w = kernels.quant_dequantize()(m.qweight, m.scales, m.qzeros, 96, dtype)
    assert torch.equal(w, reference_weight(q, s, z, 96 if group == -1 else group).to(dtype))


@pytest.mark.parametrize(
    "rows", [1, 4, 12, 40]
)  # the packed-code kernel up to 8 rows, dequantize + matmul above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_on_native_kernels_matches_the_portable_path(rows, dtype, exact_quant):
    m, *_ = random_module(4, 32, perm=True, bias=True)
    x = torch.randn(2, rows, 96)
    want = m(x)  # fp32 portable dequantization (kernel None until prepare)
    m = m.to(dtype)
    m.prepare()
    assert m.kernel == "native" and hasattr(m, "qweight")  # the portable layout is what it reads
    got = m(x.to(dtype)).float()
    if dtype == torch.float32:  # only the order of the sums differs
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    else:  # bf16 scales and activations: held to the same module in fp32, as PyTorch's bf16 is
        xb = x.to(dtype)  # the fp32 copy takes the same values in fp32
        assert_bf16_as_close_as_pytorch(
            got, *pytorch_fp32_and_bf16(m, lambda mod: mod(xb.to(mod.scales.dtype)))
        )


def test_shapes_the_kernels_cannot_take_keep_the_portable_path():
    m, *_ = random_module(4, 16, in_f=96)  # groups of 16: not a multiple of 32
    m.prepare()
    assert m.kernel != "native" and not m.native_fits()
    m3, *_ = random_module(3, 32)
    m3.prepare()
    assert m3.kernel is None  # 3 bits: dequantize on the fly
    with pytest.raises(RuntimeError, match="group size must be a multiple of 32"):
        kernels.quant_matmul()(
            torch.randn(1, 96), m.qweight, m.scales, m.qzeros, torch.empty(0, dtype=torch.int32), False
        )


def test_module_falls_back_when_kernels_are_turned_off(monkeypatch):
    m, *_ = random_module(8, -1, bias=True)
    x = torch.randn(3, 96)
    want = m(x)
    m.prepare()
    assert m.kernel == "native"
    monkeypatch.setenv("LLAMALAB_KERNELS", "0")
    kernels.reset()
    try:
        torch.testing.assert_close(m(x), want)
    finally:
        monkeypatch.undo()
        kernels.reset()


# --- the native decode step on quantized models ------------------------------------------------------------


def quantize_projections(model, bits, group, names=None, perm=False):
    """Swap the named projections (all by default) of every block for UniformQuantLinear (RTN)."""
    for i in range(len(model.model.layers)):
        for name in names or ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            parent = "self_attn" if name[0] in "qkvo" else "mlp"
            full = f"model.layers.{i}.{parent}.{name}"
            w = get_module(model, full).weight.detach().float()
            p = torch.randperm(w.shape[1]) if perm else None
            q, s, z = group_affine(w if p is None else w[:, p], bits, group)
            mod = UniformQuantLinear.from_codes(q, s, z, bits, group, perm=p)
            set_module(model, full, mod.to(model.model.embed_tokens.weight.dtype))
            mod.prepare()
    return model


@pytest.mark.parametrize(
    "bits,group,names,perm",
    [
        (4, 32, None, False),
        (8, -1, None, False),
        (4, -1, None, True),  # act-order permutations
        (4, 32, ("gate_proj", "up_proj", "down_proj"), False),  # quantized MLP beside dense (fused) attention
        (8, 32, ("q_proj", "v_proj"), False),  # a group mixing quantized and dense projections
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_on_a_quantized_model_matches_the_pytorch_path(
    bits, group, names, perm, dtype, exact_quant
):
    model = ours_from_hf(hf_model(dtype=dtype, num_key_value_heads=2), dtype=dtype)
    model.fuse()  # what stays dense runs fused, as after `llamalab.load`
    quantize_projections(model, bits, group, names, perm)
    ids = torch.randint(0, 512, (1, 30))
    ref, ref_cache = decode(model, ids, native=False)
    got, got_cache = decode(model, ids, native=True)
    end = ids.shape[1]
    if dtype == torch.float32:  # only the order of fp32 sums (norms, attention) differs
        torch.testing.assert_close(got_cache.k[0][:, :, :end], ref_cache.k[0][:, :, :end])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:
        # Layer 0's keys and values come through the same bf16 norm, the same kernel tiles and the same RoPE.
        assert torch.equal(got_cache.k[0][:, :, :end], ref_cache.k[0][:, :, :end])
        assert torch.equal(got_cache.v[0][:, :, :end], ref_cache.v[0][:, :, :end])
        assert_bf16_within_pytorch_error(model, ids, got)


def test_native_step_reads_the_buffers_it_finds_and_declines_other_formats(exact_quant):
    model = ours_from_hf(hf_model(dtype=torch.bfloat16), dtype=torch.bfloat16)
    quantize_projections(model, 4, 32)
    ids = torch.randint(0, 512, (1, 20))
    before, _ = decode(model, ids, native=True)
    q = model.model.layers[0].self_attn.q_proj
    q.scales = q.scales * 2  # new storage, as `model.to(...)` gives
    ref, _ = decode(model, ids, native=False)
    got, _ = decode(model, ids, native=True)  # a new decoder reads the new scales
    assert not torch.equal(got, before)
    assert_bf16_within_pytorch_error(model, ids, got)
    # a 3-bit module (no native kernel) anywhere sends decoding down the PyTorch path
    model = ours_from_hf(hf_model(dtype=torch.bfloat16), dtype=torch.bfloat16)
    quantize_projections(model, 3, 32, names=("up_proj",))
    cache = DenseCache.for_model(model.config, 32, dtype=torch.bfloat16)
    step, why = NativeDecoder.create(model, cache)
    assert step is None and "no native form" in why


@pytest.mark.slow
@pytest.mark.parametrize("method,bits,group", [("rtn", 4, 64), ("rtn", 8, -1), ("nf4", 4, 64)])
def test_default_model_quantized_decodes_through_the_native_step(method, bits, group, smollm, exact_quant):
    """RTN int4 g64 / int8 and NF4 on the real model: fp32 greedy text identical with and without the step; in
    bf16 the step is as close to the fp32 model as PyTorch's bf16 is (teacher-forced on its greedy text)."""
    import copy

    from llamalab.quant import prepare_model, quantize_model

    llm = copy.copy(smollm)
    llm.model = copy.deepcopy(smollm.model)
    quantize_model(llm, method, bits, group, progress=False)
    prepare_model(llm.model)
    prompt = llm.encode("The history of Paris begins", add_special_tokens=False)
    params = [llm.sampling(max_new_tokens=32)]
    native_engine, plain_engine = llm.engine(max_len=64), llm.engine(max_len=64, native=False)
    assert native_engine.decode_path == "native"  # every projection on the step
    native = [e.seq for e in native_engine.run([prompt], params)][-1].output_ids
    assert native == [e.seq for e in plain_engine.run([prompt], params)][-1].output_ids
    llm.model.to(torch.bfloat16)
    full = torch.tensor([prompt + native])
    ref, _ = decode(llm.model, full, native=False, steps=len(native))
    got, _ = decode(llm.model, full, native=True, steps=len(native))
    assert_bf16_within_pytorch_error(llm.model, full, got, steps=len(native))


# --- NF4 (QLoRA's storage) on the same kernels ------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 20])
def test_nf4_on_native_kernels_matches_its_dequantized_weight(double_quant, rows):
    from llamalab.quant.nf4 import NF4Linear

    m = NF4Linear.from_weight(torch.randn(24, 128), torch.randn(24), 64, double_quant)
    w = m.dequantize()  # the reference: table[code] * absmax, block by block, high nibble first
    x = torch.randn(rows, 128)
    m.prepare()
    assert m.kernel == "native"
    torch.testing.assert_close(
        m(x), x @ w.T + m.bias, atol=1e-5 * float((x.abs() @ w.abs().T).max()), rtol=1e-5
    )
    codes, absmax, levels = m.native_layout()
    assert torch.equal(kernels.quant_dequantize()(codes, absmax, levels, 128, torch.float32), w)
    assert (
        m.storage_bytes == NF4Linear.from_weight(torch.randn(24, 128), None, 64, double_quant).storage_bytes
    )


def test_nf4_state_dict_load_rebuilds_the_absmax_table():
    from llamalab.quant.nf4 import NF4Linear

    a = NF4Linear.from_weight(torch.randn(8, 64), None)
    b = NF4Linear.from_weight(torch.randn(8, 64), None)
    a.prepare()
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 64)
    torch.testing.assert_close(a(x), x @ b.dequantize().T)


def quantize_nf4(model):
    from llamalab.quant.nf4 import NF4Linear

    for name, mod in list(model.named_modules()):
        if name.endswith("_proj"):
            w = mod.weight.detach()
            set_module(model, name, NF4Linear.from_weight(w.float(), None).to(w.dtype))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_on_an_nf4_model_matches_the_pytorch_path(dtype):
    # widths that are multiples of the 64-value blocks (the tiny default MLP width, 160, is not: see below)
    model = ours_from_hf(hf_model(dtype=dtype, num_key_value_heads=2, intermediate_size=192), dtype=dtype)
    quantize_nf4(model)
    ids = torch.randint(0, 512, (1, 30))
    ref, _ = decode(model, ids, native=False)
    got, _ = decode(model, ids, native=True)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:
        assert_bf16_within_pytorch_error(model, ids, got)


def test_nf4_blocks_across_rows_keep_the_portable_path():
    from llamalab.quant.nf4 import NF4Linear

    m = NF4Linear.from_weight(torch.randn(64, 160), None)  # 160 columns: blocks of 64 straddle rows
    x = torch.randn(3, 160)
    torch.testing.assert_close(m(x), x @ m.dequantize().T)
    assert m.kernel is None and not m.native_fits()
