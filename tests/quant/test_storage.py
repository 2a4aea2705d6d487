"""Packing round-trips bit-exactly; formats compute what they store; the CPU kernels agree with dequantization."""

import pytest
import torch
import torch.nn.functional as F

from llamalab import kernels
from llamalab.errors import LlamalabError
from llamalab.quant.base import UniformQuantLinear
from llamalab.quant.pack import pack, packed_len, unpack
from llamalab.quant.quantizer import affine_params, group_affine
from tests.bf16_reference import assert_bf16_as_close_as_pytorch


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 133])
def test_pack_roundtrip_is_bit_exact(bits, n):
    q = torch.randint(0, 2**bits, (3, 5, n), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, packed_len(n, bits))
    assert torch.equal(unpack(p, bits, n), q)


def test_pack_layout_is_the_documented_bit_stream():
    # 4-bit: element 2j in the low nibble; 2-bit: first code in the lowest bits; 3-bit: a little-endian stream
    assert pack(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    codes = torch.tensor([[5, 3, 7, 1, 0, 6, 2, 4]])
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack(codes, 3).tolist() == [[(stream >> (8 * j)) & 0xFF for j in range(3)]]


def test_gptq_quantizer_conventions():
    w = torch.tensor([[0.5, 1.0, 2.0], [-3.0, -1.0, -0.5], [0.0, 0.0, 0.0]])
    p = affine_params(w, 4, convention="gptq")
    # the range is forced to contain 0, an all-zero row gets [-1, 1]
    assert torch.allclose(p.scale[:, 0], torch.tensor([2 / 15, 3 / 15, 2 / 15]).half().float())
    assert p.zero[:, 0].tolist() == [0.0, 15.0, 8.0]
    ps = affine_params(w, 4, sym=True, convention="gptq")
    assert ps.zero[:, 0].tolist() == [8.0, 8.0, 8.0]
    pm = affine_params(w, 4, convention="minmax")  # raw min/max: row 0's range is [0.5, 2]
    assert torch.allclose(pm.scale[0, 0], torch.tensor(1.5 / 15).half().float())


def _random_uniform_module(bits, group, out_f=64, in_f=256, perm=False, bias=True):
    w = torch.randn(out_f, in_f)
    q, s, z = group_affine(w, bits, group)
    p = torch.randperm(in_f) if perm else None
    b = torch.randn(out_f) if bias else None
    return UniformQuantLinear.from_codes(q, s, z, bits, group, b, p), q, s, z, p, b


@pytest.mark.parametrize("bits,group", [(8, -1), (4, 64), (4, -1), (4, 128), (3, 64), (2, 32), (8, 64)])
def test_uniform_module_dequantizes_its_codes(bits, group):
    m, q, s, z, _, b = _random_uniform_module(bits, group)
    g = 256 if group <= 0 else group
    ref = s.repeat_interleave(g, 1) * (q.float() - z.repeat_interleave(g, 1))
    assert torch.equal(m.dequantize(), ref)
    x = torch.randn(3, 5, 256)
    assert torch.allclose(m(x), x @ ref.T + b, atol=1e-4)


@pytest.mark.parametrize(
    "bits,group,kernel", [(8, -1, "int8"), (4, 64, "int4"), (4, -1, "int4"), (4, 128, "int4")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_cpu_kernels_match_dequantized_weights(bits, group, kernel, dtype, kernels_disabled):
    """PyTorch's weight-only kernels, used where llamalab's native ones are not (tests/quant/test_native_kernels.py)."""
    m, *_ = _random_uniform_module(bits, group)
    x = torch.randn(4, 256)
    want, w, bias = (
        m(x),
        m.dequantize(),
        m.bias,
    )  # dequantize-on-the-fly path, fp32; the weight from its codes
    m = m.to(dtype)
    m.prepare()
    if dtype == torch.float32:  # fp32 activations keep the portable layout (the kernels are slower there)
        assert m.kernel is None
        assert torch.equal(m(x), want)
        torch.testing.assert_close(m(x[:1]), want[:1])  # one row: another matmul kernel, the same function
        return
    assert m.kernel == kernel and not hasattr(m, "qweight")
    # Held to the fp32 result as PyTorch's own bf16 matmul of the dequantized weight is (tests/bf16_reference.py;
    # measured: the kernels' RMS error 1.2-1.6x, largest 1.4-1.7x that of the plain bf16 matmul).
    plain_bf16 = F.linear(x.to(dtype), w.to(dtype), bias.to(dtype)).float()  # not the kernel's own weight
    assert_bf16_as_close_as_pytorch(m(x.to(dtype)), want, plain_bf16)
    assert_bf16_as_close_as_pytorch(m(x.to(dtype)[:1]), want[:1], plain_bf16[:1])  # decode-shaped input


@pytest.mark.parametrize("native", [True, False])
def test_act_order_permutation_is_applied_to_the_input(native, monkeypatch, kernels_expected):
    m, q, s, z, p, b = _random_uniform_module(4, 64, perm=True)
    w_perm = s.repeat_interleave(64, 1) * (q.float() - z.repeat_interleave(64, 1))
    w = w_perm[:, torch.argsort(p)]
    x = torch.randn(2, 256)
    assert torch.allclose(m.dequantize(), w)
    assert torch.allclose(m(x), x @ w.T + b, atol=1e-4)
    if not native:
        monkeypatch.setenv("LLAMALAB_KERNELS", "0")
    kernels.reset()
    try:
        m = m.to(torch.bfloat16)
        y = m(x.bfloat16()).float()  # converts to a kernel layout on first use
        expected = "native" if native and kernels_expected else "int4"
    finally:
        monkeypatch.undo()
        kernels.reset()
    assert m.kernel == expected
    plain_bf16 = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float()
    assert_bf16_as_close_as_pytorch(y, x @ w.T + b, plain_bf16)


def test_packed_bytes_are_what_the_bits_say():
    m, *_ = _random_uniform_module(4, 64, out_f=64, in_f=256, bias=False)
    # 4-bit codes + fp32 scale (in memory) + 4-bit zero per group of 64
    assert m.nbytes == 64 * 256 // 2 + 64 * 4 * 4 + 64 * 4 // 2
    # as stored: fp16 scales -> 4 + (16 + 4) / 64 bits per weight
    assert m.storage_bytes == 64 * 256 // 2 + 64 * 4 * 2 + 64 * 4 // 2
    assert m.bits_per_weight == 4 + 20 / 64
    m3, *_ = _random_uniform_module(3, -1, out_f=8, in_f=256, bias=False)
    assert m3.qweight.numel() == 8 * 96  # 256 codes x 3 bits = 96 bytes per row


def test_group_size_must_divide_width():
    with pytest.raises(LlamalabError, match="does not divide"):
        UniformQuantLinear(576, 64, False, 4, 128)
