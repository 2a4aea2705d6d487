"""`llamalab export --format gguf`, every type it offers, loaded and run by llama.cpp.

A GGUF is only useful if llama.cpp reads it as we meant it, so llama.cpp is the judge here, not our own reader.
For each exported type llama.cpp must: tokenize text as we do (the tokenizer metadata), compute over the file
the logits we compute over it (with its own RoPE layout and hyper-parameters, so the Q/K re-permutation and
every `llama.*` key are checked), and, running the quantized file as stored (its quantized dot products round
the activations too), make our greedy choices except at near-ties.
"""

import pytest
import torch

import llamalab
from llamalab.io.gguf_export import TYPES, export_gguf
from tests.llama_cpp_reference import dequantized, logits

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do."
)


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """One tiny LLaMA (random weights, widths in multiples of the 32-value blocks) as a GGUF and as an HF
    directory: the exporter copies a GGUF's tokenizer but rebuilds an HF directory's from tokenizer.json."""
    from llamalab.io.hf import write_hf_dir
    from llamalab.io.tokenizer import Tokenizer
    from tests.tiny import CHATML, hf_model, tiny_bpe, write_tiny_gguf

    root = tmp_path_factory.mktemp("export_sources")
    tok = tiny_bpe()
    hf = hf_model(
        vocab_size=tok.get_vocab_size(), num_key_value_heads=2, hidden_size=128, intermediate_size=320
    )
    write_tiny_gguf(root / "tiny.gguf", hf, tok, "F32")
    tokenizer = Tokenizer(tok, eos_token="<|im_end|>", chat_template=CHATML)
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    write_hf_dir(root / "tiny-hf", hf.config.to_dict(), state, tokenizer=tokenizer)
    return {"gguf": root / "tiny.gguf", "hf": root / "tiny-hf"}


def test_the_types_tested_are_the_types_offered():
    assert set(TYPES) == {"f32", "f16", "q8_0", "q4_0"}


def assert_llama_cpp_runs_it_as_we_do(llama_cpp, path, tmp_path, ids, atol):
    """The exported file `path` in llama.cpp against llamalab reading the same file (see the module doc)."""
    ours = llamalab.load(str(path))
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert vocab.tokenize(TEXT.encode(), add_bos=False, special=True) == ours.encode(
            TEXT, add_special_tokens=False
        )
    finally:
        vocab.close()
    with torch.no_grad():
        got = ours.model(torch.tensor([ids]))[0]
    as_stored = logits(llama_cpp, path, ids)
    # The same weights in fp32 on both sides (llama.cpp's own dequantization of its quantized blocks).
    if set(ours.checkpoint.tensor_types.values()) == {"F32"}:
        fp32 = as_stored
    else:
        fp32 = logits(llama_cpp, dequantized(llama_cpp, path, tmp_path / f"{path.stem}-as-f32.gguf"), ids)
    torch.testing.assert_close(got, fp32, atol=atol, rtol=1e-5)
    # As stored, llama.cpp rounds activations in its F16/Q8_0/Q4_0 dot products: greedy choices agree except
    # where our top two are closer than twice that rounding's largest effect on any logit.
    margin = 2 * float((as_stored - fp32).abs().max())
    lead = got.max(-1).values - got.gather(-1, as_stored.argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((lead <= margin).all()), (lead.tolist(), margin)


@pytest.mark.parametrize("source", ["gguf", "hf"])
@pytest.mark.parametrize("qtype", list(TYPES))
def test_llama_cpp_runs_every_exported_type_as_we_do(qtype, source, tiny_sources, llama_cpp, tmp_path):
    path = export_gguf(llamalab.load(str(tiny_sources[source])), tmp_path / f"tiny-{qtype}.gguf", qtype)
    ids = torch.randint(0, 400, (40,)).tolist()
    assert_llama_cpp_runs_it_as_we_do(llama_cpp, path, tmp_path, ids, atol=1e-5)


@pytest.mark.slow
def test_llama_cpp_runs_the_default_model_exported_as_q4_0(smollm, llama_cpp, tmp_path, alice_text):
    """The real model through the command line, in the most lossy type offered: llama.cpp agrees on real text."""
    from llamalab.cli import main

    path = tmp_path / "smollm-q4_0.gguf"
    assert main(["export", "--format", "gguf", "--type", "q4_0", "--out", str(path)]) == 0
    ids = smollm.encode(alice_text[5000:7000], add_special_tokens=False)[:64]
    # logits of magnitude ~35 through 30 layers: summation order alone moves them by ~1e-4
    assert_llama_cpp_runs_it_as_we_do(llama_cpp, path, tmp_path, ids, atol=1e-3)
