"""GGUF tensor types against llama.cpp, the reference for its own formats.

llama.cpp quantizes a tiny model (random weights, widths that suit every block size) into each of its
formats, with its own quantizer, so the blocks are real: scales, mins and sub-block scales as llama.cpp writes
them. It then writes its own dequantization of that file as F32. Our reader must give the same weights bit
for bit, and our forward pass over the quantized file the logits llama.cpp computes over those weights in
fp32: every block layout, scale convention and the Q/K row permutation is checked against llama.cpp itself,
not against the `gguf` package our reader also uses (tests/io/test_gguf.py compares with transformers, which
reads GGUF through that same package).
"""

import pytest
import torch

import llamalab
from tests.llama_cpp_reference import dequantized, logits, quantize
from tests.tiny import hf_model, tiny_bpe, write_tiny_gguf

# llama.cpp file types and the tensor types each one writes for this model (its quantizer keeps some tensors
# at a higher precision: output.weight in Q6_K, some K-quant layers a step up).
FTYPES = {
    "MOSTLY_F16": {"F16"},
    "MOSTLY_BF16": {"BF16"},
    "MOSTLY_Q4_0": {"Q4_0", "Q6_K"},
    "MOSTLY_Q4_1": {"Q4_1", "Q6_K"},
    "MOSTLY_Q5_0": {"Q5_0", "Q6_K"},
    "MOSTLY_Q5_1": {"Q5_1", "Q6_K"},
    "MOSTLY_Q8_0": {"Q8_0"},
    "MOSTLY_Q2_K": {"Q2_K", "Q3_K", "Q6_K"},
    "MOSTLY_Q3_K_S": {"Q3_K", "Q6_K"},
    "MOSTLY_Q4_K_S": {"Q4_K", "Q5_K", "Q6_K"},
    "MOSTLY_Q5_K_S": {"Q5_K", "Q6_K"},
    "MOSTLY_Q6_K": {"Q6_K"},
}


@pytest.fixture(scope="module")
def f32_source(tmp_path_factory):
    """A 2-layer GQA LLaMA (d=256, MLP 512: multiples of the K-quants' 256-value blocks) as an F32 GGUF."""
    tok = tiny_bpe()
    hf = hf_model(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    path = tmp_path_factory.mktemp("llama_cpp_types") / "tiny-f32.gguf"
    write_tiny_gguf(path, hf, tok, "F32")
    return path


def test_the_file_types_cover_every_tensor_type_we_read():
    from tests.io.test_gguf import TYPES

    assert set().union(*FTYPES.values()) | {"F32"} == set(TYPES)


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_tensor_type_reads_as_llama_cpp_dequantizes_it(ftype, f32_source, llama_cpp, tmp_path):
    quantized = quantize(llama_cpp, f32_source, tmp_path / f"{ftype}.gguf", ftype)
    reference = dequantized(llama_cpp, quantized, tmp_path / f"{ftype}-as-f32.gguf")
    ours = llamalab.load(str(quantized))
    assert set(ours.checkpoint.tensor_types.values()) - {"F32"} == FTYPES[ftype]
    want = llamalab.load(str(reference)).model.state_dict()
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    ids = torch.randint(0, ours.config.vocab_size, (24,)).tolist()
    with torch.no_grad():
        got = ours.model(torch.tensor([ids]))[0]
    # The same fp32 weights through two fp32 implementations: they differ in summation order only.
    torch.testing.assert_close(got, logits(llama_cpp, reference, ids), atol=1e-5, rtol=1e-5)
