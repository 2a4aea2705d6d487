"""Calibration windows cut by each reference's rule (GPTQ's get_wikitext2 / get_c4, AWQ's get_calib_dataset),
against slow re-statements of those rules."""

import json
import random

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.quant.calib import CalibConfig, awq_blocks, calibration_ids, document_windows


def word_tokenize(text):
    return [len(w) for w in text.split()]  # one token per word; any deterministic tokenizer will do


DOCS = [" ".join(f"w{'x' * (i % 7)}" for i in range(n)) for n in (3, 40, 9, 70, 12, 25, 55, 2, 33)]


def reference_c4(docs, seqlen, nsamples, seed):
    """GPTQ's get_c4: random.seed(seed); per sample, draw documents until one has more than seqlen tokens,
    then a window at randint(0, len - seqlen - 1)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = word_tokenize(docs[i])
            if len(enc) > seqlen:
                break
        i = random.randint(0, len(enc) - seqlen - 1)
        out.append(enc[i : i + seqlen])
    return out


def reference_awq(lines, block, n_blocks):
    """AWQ's get_calib_dataset (lines already shuffled): keep stripped lines of at most `block` tokens and
    not empty, concatenate, cut consecutive blocks (here: the first n_blocks)."""
    samples = []
    for line in lines:
        enc = word_tokenize(line.strip())
        if len(enc) > block or not enc:
            continue
        samples.extend(enc)
    return [samples[i * block : (i + 1) * block] for i in range(len(samples) // block)][:n_blocks]


def test_document_windows_follow_gptq_c4():
    for seed in (0, 3):
        cfg = CalibConfig("docs.jsonl", nsamples=6, seq_len=30, seed=seed)
        ours = document_windows(DOCS, word_tokenize, cfg)
        assert ours.tolist() == reference_c4(DOCS, 30, 6, seed)
    with pytest.raises(LlamalabError, match="no document is longer"):
        document_windows(DOCS, word_tokenize, CalibConfig("docs.jsonl", nsamples=1, seq_len=70))


def test_awq_blocks_follow_awq_pile_val():
    cfg = CalibConfig("pile-val", nsamples=2, seq_len=20)
    lines = DOCS + ["  " + d + " \n" for d in DOCS]
    assert awq_blocks(lines, word_tokenize, cfg).tolist() == reference_awq(lines, 20, 2)
    with pytest.raises(LlamalabError, match="make only"):
        awq_blocks(lines, word_tokenize, CalibConfig("pile-val", nsamples=50, seq_len=20))


def test_a_jsonl_file_is_cut_per_document(tmp_path):
    from tests.tiny import tiny_chat_llm

    tok = tiny_chat_llm(context=96).tokenizer
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    ids = calibration_ids(tok, CalibConfig(str(path), nsamples=4, seq_len=16, seed=1))
    assert ids.shape == (4, 16)
    docs = [tok.encode(d, add_special_tokens=True) for d in DOCS]
    # every window lies inside one document
    assert all(any(_contains(d, w) for d in docs) for w in ids.tolist())
    path.write_text('{"text": "fine"}\n{"txt": 1}\n')
    with pytest.raises(LlamalabError, match=r"docs.jsonl:2: not a JSON object"):
        calibration_ids(tok, CalibConfig(str(path), nsamples=1, seq_len=16))


def _contains(seq, window):
    n = len(window)
    return any(seq[i : i + n] == window for i in range(len(seq) - n + 1))


def test_a_text_stream_keeps_gptqs_wikitext_rule():
    from tests.tiny import tiny_chat_llm

    tok = tiny_chat_llm(context=96).tokenizer
    cfg = CalibConfig("alice", nsamples=3, seq_len=32, seed=5)
    ids = calibration_ids(tok, cfg)
    from llamalab.data import alice_split

    stream = tok.encode(alice_split()[0], add_special_tokens=False)
    rng = random.Random(5)
    starts = [rng.randint(0, len(stream) - 33) for _ in range(3)]
    assert torch.equal(ids, torch.tensor([stream[i : i + 32] for i in starts]))
