"""Evaluation text sources: files, folders, and GPTQ's C4 window draw."""

from __future__ import annotations

import random

import pytest

from llamalab.errors import LlamalabError
from llamalab.eval.data import c4_windows, prepare_source, read_source_text


class WordTokenizer:
    """A whitespace tokenizer standing in for a model's (these tests are about the data plumbing)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


def test_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    text, desc = read_source_text(str(tmp_path))
    assert text == "first file\n\nsecond file" and "2 files" in desc
    tokens = prepare_source(str(tmp_path / "a.txt"))(WordTokenizer())
    assert tokens.ids == [5, 4] and tokens.description.startswith("file ")


def test_bad_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LlamalabError, match="latin1.txt: not UTF-8 text"):
        read_source_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    with pytest.raises(LlamalabError, match="e.txt: the file is empty"):
        read_source_text(str(tmp_path / "e.txt"))


def test_c4_windows_follow_gptq_random_stream():
    docs = [
        " ".join(["w" * (1 + (i + j) % 7) for j in range(n)]) for i, n in enumerate([3, 40, 10, 64, 25, 12])
    ]
    tok = WordTokenizer()
    ours = c4_windows(docs, tok, seq_len=16, seed=0, n=8)
    # GPTQ's datautils.get_c4 (eval part), written out with the global `random` module.
    random.seed(0)
    ref = []
    for _ in range(8):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok.encode(docs[i])
            if len(ids) >= 16:
                break
        start = random.randint(0, len(ids) - 16 - 1)
        ref.extend(ids[start : start + 16])
    assert ours == ref and len(ours) == 8 * 16
