"""Retrieval augmentation: word chunks, BM25 (bm25s) and dense (all-MiniLM-L6-v2) retrieval, top-k and
order, the reducer the eval harness uses, and `llamalab rag` answering with its sources."""

from __future__ import annotations

import pytest

from llamalab.errors import LlamalabError
from llamalab.longctx.rag import chunk_folder, chunk_words, make_retriever, retrieve

FACTS = [
    "The lighthouse keeper painted the tower red every spring before the storms arrived.",
    "Quantum computers use qubits that can hold superpositions of zero and one.",
    "The bakery on Elm Street sells sourdough bread and cinnamon rolls every morning.",
    "Volcanoes form where magma rises through cracks in the crust of the earth.",
]


def test_word_chunks():
    chunks = chunk_words(" ".join(f"w{i}" for i in range(650)), 300)
    assert [len(c.text.split()) for c in chunks] == [300, 300, 50]
    assert chunks[1].text.split()[0] == "w300" and [c.index for c in chunks] == [0, 1, 2]
    with pytest.raises(LlamalabError, match="at least 1"):
        chunk_words("a b", 0)


@pytest.mark.parametrize("name", ["bm25", "dense"])
def test_retrievers_find_the_relevant_chunk(name):
    chunks = [c for i, f in enumerate(FACTS) for c in chunk_words(f, 300, f"doc{i}.txt", i)]
    retriever = make_retriever(name, chunks)
    query = (
        "Which shop sells sourdough bread?" if name == "bm25" else "where can I buy fresh pastries and loaves"
    )
    best = retrieve(retriever, query, top_k=2)
    assert best[0][0].source == "doc2.txt" and best[0][1] > best[1][1]
    in_order = retrieve(retriever, query, top_k=3, order="document")
    assert [c.order for c, _ in in_order] == sorted(c.order for c, _ in in_order)
    assert {c.order for c, _ in in_order} == {c.order for c, _ in retrieve(retriever, query, top_k=3)}


def test_bad_input(tmp_path):
    with pytest.raises(LlamalabError, match="unknown retriever 'tfidf'"):
        make_retriever("tfidf", chunk_words("a b c"))
    with pytest.raises(LlamalabError, match="no such file or folder"):
        chunk_folder(str(tmp_path / "missing"))
    with pytest.raises(LlamalabError, match="no text files"):
        chunk_folder(str(tmp_path))


def test_rag_command_answers_with_sources(tiny_dir, tmp_path):
    from tests.test_cli import assert_clean_error, run

    for i, fact in enumerate(FACTS):
        (tmp_path / f"doc{i}.txt").write_text(fact)
    proc = run("rag", "--model", str(tiny_dir), "--docs", str(tmp_path), "--question",
               "Which shop sells sourdough bread?", "--top-k", "2", "--max-new-tokens", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sources = proc.stdout.split("Sources:")[1]
    assert sources.strip().startswith("[1] doc2.txt, chunk 1") and "[2]" in sources
    assert_clean_error(run("rag", "--model", str(tiny_dir), "--docs", str(tmp_path / "nope"), "-q", "x"),
                       "no such file or folder")  # fmt: skip


@pytest.mark.slow
def test_rag_reducer_keeps_the_passkey(smollm):
    import random

    from llamalab.eval.passkey import generate_prompt
    from llamalab.longctx.rag import RAGReducer

    prompt, key, _ = generate_prompt(12000, random.Random(3))
    ids = smollm.encode(prompt)
    reduced = RAGReducer(smollm, "bm25", top_k=2, chunk_words_=100, question_len=12)(ids, 10)
    assert len(reduced) < 400 and str(key) in smollm.decode(reduced)
