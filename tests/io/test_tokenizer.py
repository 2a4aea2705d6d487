"""Tokenizer parity: our GGUF-built tokenizers against transformers and llama.cpp (built by `make setup`)."""

import pytest

from llamalab.io.gguf import GGUFFile
from llamalab.io.tokenizer import Tokenizer

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "emoji 😀🎉👩‍👩‍👧 and CJK 中文字符, 日本語のテキスト, 한국어",
    "def f(x):\n    return x  +  1\n\n\n# done\t\ttabs",
    "   leading spaces, runs of     spaces and\n\n\n\nnewlines   ",
    "Numbers 12345, 3.14159, 2024-11-27 and 1,000,000 apples",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé àccents, ÆØÅ, and «quotes» — dashes… ellipses",
    "",
]


@pytest.fixture(scope="module")
def gguf_tok(smollm_path):
    return Tokenizer.from_gguf(GGUFFile(smollm_path).metadata)


@pytest.fixture(scope="module")
def hf_reference(smollm_path):
    """transformers' tokenizer for the GGUF, with the pre-tokenizer of SmolLM2's own tokenizer.json
    (transformers' GGUF conversion drops its digit split, which changes text such as '  1')."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    gguf_as_converted = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok, gguf_as_converted


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(gguf_tok, hf_reference, text):
    original, as_converted = hf_reference
    ids = gguf_tok.encode(text)
    assert ids == original.encode(text, add_special_tokens=False)
    assert gguf_tok.decode(ids) == original.decode(ids) == text
    if not any(c.isdigit() for c in text):  # where the digit split cannot matter, the stock conversion agrees
        assert ids == as_converted.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def smollm_vocab_in_llama_cpp(llama_cpp, smollm_path):
    ll = llama_cpp.Llama(str(smollm_path), vocab_only=True, verbose=False)
    yield ll
    ll.close()


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS[:-1])
def test_encode_equals_llama_cpp(gguf_tok, smollm_vocab_in_llama_cpp, text):
    assert gguf_tok.encode(text) == smollm_vocab_in_llama_cpp.tokenize(
        text.encode(), add_bos=False, special=True
    )


@pytest.mark.slow
def test_special_tokens_and_eos(gguf_tok):
    assert gguf_tok.eos_token == "<|im_end|>" and gguf_tok.eos_token_id == 2
    assert gguf_tok.encode("<|im_start|>") == [1]
    assert gguf_tok.decode([1, 2], skip_special_tokens=True) == ""


def _sentencepiece_vocab():
    """A small SentencePiece-style BPE vocabulary (▁ for spaces, <0xNN> byte fallback, scores = -rank)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, normalizers, trainers

    from llamalab.data import sample_text

    tok = HFTok(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials)
    tok.train_from_iterator([sample_text()[:30000]], trainer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    types = [
        2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens
    ]
    scores = [0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)]
    return tokens, scores, types


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    from gguf import GGUFWriter

    tokens, scores, types = _sentencepiece_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_TEXTS = [
    "Alice was beginning to get very tired",
    "two  spaces inside",
    "unseen bytes: 中文 😀",
    "x\ny",
    "a",
]


def test_sentencepiece_gguf_vocab_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf(GGUFFile(spm_gguf).metadata)
    ref = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    for text in SPM_TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    assert ours.encode("hi")[0] == 1  # SentencePiece vocabularies add BOS by default


def test_sentencepiece_gguf_vocab_matches_llama_cpp(spm_gguf, llama_cpp):
    """Including leading spaces, where transformers 5's Metaspace(prepend_scheme='first') differs from
    SentencePiece's dummy prefix and llama.cpp; we follow llama.cpp."""
    ours = Tokenizer.from_gguf(GGUFFile(spm_gguf).metadata)
    ll = llama_cpp.Llama(str(spm_gguf), vocab_only=True, verbose=False)
    for text in SPM_TEXTS + ["  two leading spaces", " one", "   three", "trailing  "]:
        assert ours.encode(text) == ll.tokenize(text.encode(), add_bos=True, special=True), text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    ll.close()
