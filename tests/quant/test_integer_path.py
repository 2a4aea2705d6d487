"""The native kernels' integer path (8-bit activations, VPDPBUSD; kernels/qgemm.h) and GGUF blocks run as
stored (llamalab.quant.gguf_linear), against slow references written from the formats' definitions.

The integer path is not exact by design: it rounds each 32 activations to int8 with their own scale, as
llama.cpp does. Its reference therefore does the same rounding, one element at a time, and sums
scale * sx * (code - zero) * xq (or scale * sx * code * xq + min * sx * xq) in fp64: the kernel may differ
from it only by the order of its fp32 sums.
"""

import numpy as np
import pytest
import torch

import llamalab
from llamalab import kernels
from llamalab.quant.base import NO_PERM, UniformQuantLinear
from llamalab.quant.embedding import QuantEmbedding
from llamalab.quant.gguf_linear import GGUFLinear, nibble_permutation
from llamalab.quant.quantizer import group_affine


@pytest.fixture(autouse=True)
def native(native_kernels):
    """Skip where the kernels are not supported, fail where they should work and do not (tests/conftest.py)."""


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and block of 32 columns: sx = max|x| / 127 and xq = round_half_even(x * (127 / max|x|)),
    computed in fp32 as the kernel computes them. Returns xq (rows, K) and sx (rows, K / 32)."""
    rows, K = x.shape
    xq, sx = torch.zeros(rows, K), torch.zeros(rows, K // 32)
    for r in range(rows):
        for b in range(K // 32):
            v = x[r, 32 * b : 32 * b + 32].float()
            amax = v.abs().max()
            inv = torch.tensor(127.0) / amax if amax > 0 else torch.tensor(0.0)
            xq[r, 32 * b : 32 * b + 32] = torch.round(v * inv)
            sx[r, b] = amax / 127
    return xq, sx


def integer_reference(x, codes, scales, group, zeros=None, mins=None) -> torch.Tensor:
    """y[r, n] = sum over blocks of sx[r, b] * sum(scale[n, g] * (code - zero) * xq) (+ min * sx * sum(xq)),
    g each column's group (groups of 16 split a block of 32), in fp64, columns in the order the codes multiply
    them."""
    xq, sx = quantized_activations(x)
    N, K = codes.shape
    y = torch.zeros(x.shape[0], N, dtype=torch.float64)

    def per_column(t):
        return None if t is None else t.double().repeat_interleave(group, 1)

    s_col, z_col, m_col = per_column(scales), per_column(zeros), per_column(mins)
    for r in range(x.shape[0]):
        for b in range(K // 32):
            cols = slice(32 * b, 32 * b + 32)
            c = codes[:, cols].double()
            q = xq[r, cols].double()
            if mins is None:
                y[r] += sx[r, b].double() * ((s_col[:, cols] * (c - z_col[:, cols])) @ q)
            else:
                y[r] += sx[r, b].double() * ((s_col[:, cols] * c + m_col[:, cols]) @ q)
    return y


def assert_close_to_reference(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    # fp32 sums in another order: relative to the sum of the terms' magnitudes; bf16 output: one rounding
    order = 1e-5 * float((x.abs().float() @ w.abs().T).max())
    rtol = 2**-8 if got.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), ref, atol=order, rtol=rtol)


# K = 160: five blocks of 32, so the last 64-code chunk holds one block. Groups that do not tile the chunks
# (per channel over 160 columns) take the exact path instead.
CASES = [(4, 32, False, 160), (4, 64, True, 192), (4, -1, False, 192), (8, -1, False, 192), (8, 32, True, 160),
         (4, -1, False, 160), (8, -1, False, 160)]  # fmt: skip


@pytest.mark.parametrize("bits,group,perm,K", CASES)
@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_path_on_the_portable_layout(bits, group, perm, K, rows, dtype):
    w = torch.randn(21, K)
    p = torch.randperm(K) if perm else None
    q, s, z = group_affine(w if p is None else w[:, p], bits, group)
    m = UniformQuantLinear.from_codes(q, s, z, bits, group, perm=p)
    x = torch.randn(rows, K).to(dtype)
    got = kernels.quant_matmul()(x, m.qweight, m.scales, m.qzeros, NO_PERM if p is None else m.perm, True)
    xc = x.float() if p is None else x.float()[:, p]  # the input in code order
    g = K if group == -1 else group
    if g == 32 or g % 64 == 0:
        ref = integer_reference(xc, q, m.scales, g, zeros=m.zeros())
    else:
        ref = x.double() @ m.dequantize().double().T
    assert_close_to_reference(got, ref, x, m.dequantize())
    # and within the 8-bit rounding of the exact product: a few percent of the largest output at most
    exact = x.float() @ m.dequantize().T
    assert float((got.float() - exact).abs().max()) < 0.05 * float(exact.abs().max())


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (8, -1)])
def test_symmetric_codes_take_the_shared_zero_path_with_the_same_result(bits, group):
    """Every zero mid-range: the module hands the kernels no zeros (one subtraction per chunk for all rows
    instead of a dot product per row); both paths give the same integers, so the same outputs bit for bit."""
    from llamalab.quant.base import NO_ZEROS

    w = torch.randn(40, 192)
    q, s, z = group_affine(w, bits, group, sym=True)
    m = UniformQuantLinear.from_codes(q, s, z, bits, group)
    m.prepare()
    assert m.shared_zero and m.native_tensors(torch.float32)[2] is NO_ZEROS
    x = torch.randn(3, 192)
    for integer in (True, False):
        with_zeros = kernels.quant_matmul()(x, m.qweight, m.scales, m.qzeros, NO_PERM, integer)
        assert torch.equal(
            kernels.quant_matmul()(x, m.qweight, m.scales, NO_ZEROS, NO_PERM, integer), with_zeros
        )
    with kernels.exact_quant():
        torch.testing.assert_close(m(x), x @ m.dequantize().T, atol=1e-4, rtol=1e-4)
    q, s, z = group_affine(w, bits, group)  # asymmetric: the zeros are handed over
    m = UniformQuantLinear.from_codes(q, s, z, bits, group)
    m.prepare()
    assert not m.shared_zero and m.native_tensors(torch.float32)[2] is m.qzeros


def gguf_blocks(w: torch.Tensor, qtype: str):
    import gguf

    gtype = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(w.numpy(), gtype)
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, gtype).copy())


def gguf_codes(
    blocks: np.ndarray, qtype: str, shape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes (element order), scales and mins of GGUF blocks, read from ggml's block layout."""
    N, K = shape
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    raw = blocks.reshape(N, K // 32, size)
    d = torch.from_numpy(raw[:, :, :2].copy().view(np.float16).astype(np.float32)).reshape(N, -1)
    mins = None
    if qtype == "Q4_1":
        mins = torch.from_numpy(raw[:, :, 2:4].copy().view(np.float16).astype(np.float32)).reshape(N, -1)
    qs = raw[:, :, size - (32 if qtype == "Q8_0" else 16) :]
    if qtype == "Q8_0":
        codes = torch.from_numpy(qs.copy().view(np.int8).astype(np.int64)).reshape(N, K)
    else:
        codes = torch.from_numpy(np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)).reshape(N, K)
    return codes, d, mins


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize(
    "rows", [1, 4, 20]
)  # the packed-code kernels up to 8 rows, dequantize + matmul above
def test_gguf_blocks_as_stored(qtype, rows):
    w = torch.randn(19, 96)
    blocks, w_ref = gguf_blocks(w, qtype)
    m = GGUFLinear.from_blocks(blocks, qtype, 19, 96)
    assert torch.equal(m.dequantize(), w_ref)  # ggml's dequantization, value for value
    assert m.bits_per_weight == {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5}[qtype]  # the file's own cost
    x = torch.randn(rows, 96)
    with kernels.exact_quant():
        torch.testing.assert_close(
            m(x), x @ w_ref.T, atol=1e-5 * float((x.abs() @ w_ref.abs().T).max()), rtol=1e-5
        )
    codes, d, mins = gguf_codes(blocks, qtype, (19, 96))
    if rows <= 8:  # the integer path: each product of a few rows
        zeros = torch.full((19, 3), 8 if qtype == "Q4_0" else 0) if mins is None else None
        ref = integer_reference(x, codes, d, 32, zeros=zeros, mins=mins)
        assert_close_to_reference(m(x), ref, x, w_ref)
    codes_t, scales, offsets, perm = m.native_tensors(torch.float32)
    dense = kernels.quant_dequantize()(codes_t, scales, offsets, 96, torch.float32)
    assert torch.equal(dense if perm.numel() == 0 else dense[:, torch.argsort(perm.long())], w_ref)


def k_quant_reference(qtype: str, blocks: np.ndarray, module: GGUFLinear, shape):
    """(codes, scales, group, zeros or mins) of K-quant blocks for `integer_reference`. Q4_K: the codes in
    element order, per-32 scales d * sc and mins -dmin * mn, read with the gguf package's own unpacking of the
    6-bit scales (an implementation independent of ours). Q6_K: per-16 scales d * sc read from the blocks, and
    the codes as the module holds them (q - 32; its weights are checked equal to gguf's, so they are the
    file's)."""
    import gguf

    N, K = shape
    if qtype == "Q6_K":
        raw = blocks.reshape(-1, 210)
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
        scales = torch.from_numpy((d * raw[:, 192:208].view(np.int8).astype(np.float32)).reshape(N, -1))
        return module.codes.long(), scales, 16, {"zeros": torch.zeros(N, K // 16)}
    raw = blocks.reshape(-1, 144)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16])
    qs = raw[:, 16:].reshape(-1, 4, 1, 32)
    codes = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(N, K).astype(np.int64)
    scales = (d * sc.astype(np.float32)).reshape(N, -1)
    mins = -(dmin * mn.astype(np.float32)).reshape(N, -1)
    return torch.from_numpy(codes), torch.from_numpy(scales), 32, {"mins": torch.from_numpy(mins)}


# 20 rows take the dequantize-once dense matmul, in bf16 with bf16-rounded weights: fp32 only there
ROWS_DTYPES = [(1, torch.float32), (4, torch.float32), (5, torch.float32), (20, torch.float32),
               (1, torch.bfloat16), (5, torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("qtype,bits", [("Q4_K", 4.625), ("Q6_K", 8.5625)])
@pytest.mark.parametrize("rows,dtype", ROWS_DTYPES)
def test_k_quant_blocks_as_stored(qtype, bits, rows, dtype):
    """Q4_K (codes in the pairs order, 6-bit scales and mins widened to bytes beside the fp16 super-scales) and
    Q6_K (6-bit codes widened to signed bytes, int8 scales of 16 weights): every weight is gguf's dequantized
    value; the exact path multiplies exactly those, the integer path as the reference rounds."""
    import gguf

    from tests.tiny import _encode

    N, K = 21, 512  # two super-blocks a row
    gtype = gguf.GGMLQuantizationType[qtype]
    blocks = _encode(torch.zeros(N, K), gtype, np.random.default_rng(rows))
    w_ref = torch.from_numpy(gguf.quants.dequantize(blocks, gtype).copy())
    m = GGUFLinear.from_blocks(blocks, qtype, N, K)
    assert torch.equal(m.dequantize(), w_ref)
    assert torch.equal(m.dequantize(torch.tensor([7, 2])), w_ref[[7, 2]])
    assert m.bits_per_weight == bits  # the files' 4.5 and 6.5625: scales (Q4_K) or codes (Q6_K) widened
    x = torch.randn(rows, K).to(dtype)
    with kernels.exact_quant():
        torch.testing.assert_close(
            m(x).float(), x.float() @ w_ref.T, atol=1e-5 * float((x.float().abs() @ w_ref.abs().T).max()),
            rtol=1e-5 if dtype == torch.float32 else 2**-8,
        )  # fmt: skip
    if rows <= 8:
        codes, scales, group, offsets = k_quant_reference(qtype, blocks, m, (N, K))
        assert_close_to_reference(
            m(x), integer_reference(x.float(), codes, scales, group, **offsets), x, w_ref
        )
    tensors = m.native_tensors(torch.float32)
    assert torch.equal(kernels.quant_dequantize()(*tensors[:3], K, torch.float32), w_ref)


def test_gguf_scales_survive_a_dtype_cast():
    m = GGUFLinear.from_weight(torch.randn(8, 64), "Q4_1")
    before = m.dequantize()
    m = m.to(torch.bfloat16)  # fp16 scales held as raw bits: a cast cannot round them
    assert torch.equal(m.dequantize(), before)
    assert torch.equal(nibble_permutation(64)[:4], torch.tensor([0, 16, 1, 17], dtype=torch.int32))


@pytest.fixture(scope="module")
def tiny_stored(tmp_path_factory):
    """A tiny LLaMA whose linears (head included) are Q4_0, Q4_1 and Q8_0 in turn, as a GGUF file."""
    from tests.tiny import hf_model, tiny_bpe, write_tiny_gguf

    tok = tiny_bpe()
    hf = hf_model(
        vocab_size=tok.get_vocab_size(), num_key_value_heads=2, hidden_size=128, intermediate_size=320
    )
    path = tmp_path_factory.mktemp("stored") / "tiny-mixed.gguf"
    write_tiny_gguf(path, hf, tok, ["Q4_0", "Q4_1", "Q8_0"])
    return path


def test_a_gguf_file_runs_as_stored_on_the_native_step(tiny_stored):
    from tests.decoding import decode

    stored = llamalab.load(str(tiny_stored), dtype="stored")
    dense = llamalab.load(str(tiny_stored), dtype="fp32")  # the same blocks dequantized
    linears = [m for m in stored.model.modules() if isinstance(m, GGUFLinear)]
    assert len(linears) == 2 * 7 + 2 and {m.qtype for m in linears} == {"Q4_0", "Q4_1", "Q8_0"}
    assert isinstance(stored.model.lm_head, GGUFLinear)
    assert isinstance(stored.model.model.embed_tokens, QuantEmbedding)  # untied: a table of its own
    assert stored.engine(max_len=64).decode_path == "native"
    ids = torch.randint(0, 400, (1, 24))
    with kernels.exact_quant():  # each weight exactly the dequantized one: only the order of sums differs
        got, _ = decode(stored.model, ids, native=True)
        want, _ = decode(dense.model, ids, native=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the integer path: the native step and the PyTorch path make the same integer products
    native, _ = decode(stored.model, ids, native=True)
    plain, _ = decode(stored.model, ids, native=False)
    torch.testing.assert_close(native, plain, atol=1e-4, rtol=1e-4)
    assert float((native - want).abs().max()) < 0.05 * float(want.abs().max())


def test_a_k_quant_file_runs_as_stored_on_the_native_step(tmp_path):
    """A tiny LLaMA 256 wide (K-quants need widths in multiples of 256) with Q4_K, Q6_K and Q8_0 linears:
    loaded as stored, the exact native step matches the dequantized model; a Q5_0 tensor stays dense."""
    from llamalab.model.linear import Linear
    from tests.decoding import decode
    from tests.tiny import hf_model, tiny_bpe, write_tiny_gguf

    tok = tiny_bpe()
    hf = hf_model(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_key_value_heads=2
    )
    write_tiny_gguf(tmp_path / "k.gguf", hf, tok, ["Q4_K", "Q8_0", "Q6_K", "Q5_0"])
    stored = llamalab.load(str(tmp_path / "k.gguf"), dtype="stored")
    dense = llamalab.load(str(tmp_path / "k.gguf"), dtype="fp32")
    kinds = {m.qtype for m in stored.model.modules() if isinstance(m, GGUFLinear)}
    assert kinds == {"Q4_K", "Q8_0", "Q6_K"}
    assert any(isinstance(m, Linear) for m in stored.model.modules())  # the Q5_0 layers, dequantized
    assert stored.engine(max_len=64).decode_path == "native"
    ids = torch.randint(0, 400, (1, 20))
    with kernels.exact_quant():
        got, _ = decode(stored.model, ids, native=True)
        want, _ = decode(dense.model, ids, native=False)
        # random K-quant blocks make large logits (~500): fp32 sums in another order, relative to them
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
    native, _ = decode(stored.model, ids, native=True)
    plain, _ = decode(stored.model, ids, native=False)
    torch.testing.assert_close(native, plain, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_layers_kept_as_stored_are_never_dequantized(tiny_stored, monkeypatch):
    from llamalab.io.gguf import GGUFFile
    from llamalab.io.load import load_checkpoint

    ckpt = load_checkpoint(str(tiny_stored), stored=True)
    assert set(ckpt.stored) == {m.removesuffix(".weight") for m in load_checkpoint(str(tiny_stored)).state_dict
                                if m.endswith("_proj.weight")} | {"lm_head", "model.embed_tokens"}  # fmt: skip
    assert not any(k.endswith("_proj.weight") or k.startswith("model.embed_tokens") for k in ckpt.state_dict)
    seen = []
    dequantize = GGUFFile._dequantize
    monkeypatch.setattr(GGUFFile, "_dequantize", lambda self, t: seen.append(t.name) or dequantize(self, t))
    stored = llamalab.load(str(tiny_stored), dtype="stored")
    assert seen and all("norm" in name for name in seen), seen
    dense = load_checkpoint(str(tiny_stored)).state_dict  # every tensor dequantized
    for name, module in stored.model.named_modules():
        if isinstance(module, GGUFLinear) and not name.endswith("embed_tokens.table"):
            assert torch.equal(module.dequantize(), dense[name + ".weight"]), name
    ids = torch.tensor([[0, 5, 399], [7, 7, 1]])  # every looked-up row is exactly the dequantized row
    assert torch.equal(stored.model.model.embed_tokens(ids), dense["model.embed_tokens.weight"][ids])


def test_a_tied_embedding_is_looked_up_from_the_heads_blocks(tmp_path):
    """With a tied head, token_embd's blocks are held once: the embedding looks its rows up from the head's
    module, exactly, and sizes count the table once."""
    from llamalab.bench import decode_bytes_per_token
    from tests.tiny import hf_model, tiny_bpe, write_tiny_gguf

    tok = tiny_bpe()
    hf = hf_model(vocab_size=tok.get_vocab_size(), tie_word_embeddings=True, hidden_size=128)
    write_tiny_gguf(tmp_path / "tied.gguf", hf, tok, "Q8_0")
    stored = llamalab.load(str(tmp_path / "tied.gguf"), dtype="stored")
    dense = llamalab.load(str(tmp_path / "tied.gguf"), dtype="fp32")
    embed, head = stored.model.model.embed_tokens, stored.model.lm_head
    assert isinstance(embed, QuantEmbedding) and embed.table is head
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    assert torch.equal(embed(ids), dense.model.model.embed_tokens(ids))
    assert stored.model.num_parameters() == dense.model.num_parameters()
    table = head.codes.nbytes + head.d.nbytes  # Q8_0: codes and scales, read by the head, looked up once
    norms = sum(p.numel() * 4 for p in stored.model.parameters())
    assert stored.model.weight_bytes() == decode_bytes_per_token(stored.model) == table + norms + sum(
        m.codes.nbytes + m.d.nbytes + (0 if m.m is None else m.m.nbytes)
        for n, m in stored.model.named_modules() if isinstance(m, GGUFLinear) and n.endswith("_proj")
    )  # fmt: skip
    with kernels.exact_quant():
        torch.testing.assert_close(stored.model(ids), dense.model(ids), atol=1e-4, rtol=1e-4)
    assert stored.model.to(torch.bfloat16).model.embed_tokens(ids).dtype == torch.bfloat16


def test_stored_refuses_what_is_not_a_gguf_file(tmp_path):
    from llamalab.errors import LlamalabError
    from llamalab.io.hf import write_hf_dir
    from tests.tiny import hf_model

    hf = hf_model()
    write_hf_dir(tmp_path / "hf", hf.config.to_dict(), {k: v.float() for k, v in hf.state_dict().items()})
    with pytest.raises(LlamalabError, match="not a GGUF file"):
        llamalab.load(str(tmp_path / "hf"), dtype="stored")


@pytest.mark.slow
def test_the_default_model_runs_as_stored(smollm):
    """The embedded Q4_1 file (Q8_0 head) as stored: on the exact path, 64 greedy tokens equal the dequantized
    fp32 model's; on the integer path, teacher-forced on that text, the argmax agrees almost everywhere."""
    stored = llamalab.load("smollm2-135m", dtype="stored")
    prompt = smollm.encode("The history of Paris begins", add_special_tokens=False)
    want = smollm.generate_sequences([prompt], max_new_tokens=64)[0].output_ids
    with kernels.exact_quant():
        assert stored.generate_sequences([prompt], max_new_tokens=64)[0].output_ids == want
    from llamalab.bench import decode_argmax

    agree = sum(int(a == b) for a, b in zip(decode_argmax(stored, prompt, want), want))
    assert agree >= 60, agree  # of 64


def test_inference_commands_run_a_gguf_file_as_stored_by_default(tiny_stored, capsys):
    import json

    from llamalab.cli import main

    args = [
        "bench",
        "-m",
        str(tiny_stored),
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized"] == ["gguf qtype=Q4_0", "gguf qtype=Q4_1", "gguf qtype=Q8_0"]
    assert report["decode_path"] == "native"
    assert main([*args, "--dtype", "fp32"]) == 0  # an explicit dtype still chooses the dense path
    assert json.loads(capsys.readouterr().out)["quantized"] == []
