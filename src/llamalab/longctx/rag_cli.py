"""`llamalab rag`: answer a question from a folder of documents, citing the chunks used (`rag.py`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llamalab.model_options import ModelOptions, load_model, model_options


def register(app: typer.Typer) -> None:
    app.command(name="rag")(rag)


@model_options
def rag(
    docs: Annotated[str, typer.Option("--docs", help="A folder of text files (or one file) to answer from.")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question.")],
    retriever: Annotated[
        str, typer.Option(help="bm25 (lexical, bm25s) or dense (all-MiniLM-L6-v2).")
    ] = "bm25",
    top_k: Annotated[int, typer.Option(help="Chunks given to the model (Retrieval-meets-LC: 5).")] = 5,
    chunk_words: Annotated[int, typer.Option(help="Words per chunk (Retrieval-meets-LC: 300).")] = 300,
    order: Annotated[str, typer.Option(help="Chunks in score order or document order.")] = "score",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens of the answer.")] = 256,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Use the model's chat template.")] = True,
    *,
    opts: ModelOptions,
) -> None:
    """Retrieve the chunks of DOCS most relevant to QUESTION, answer from them, and list the sources."""
    from llamalab.errors import LlamalabError
    from llamalab.longctx.rag import answer_prompt, chunk_folder, make_retriever, retrieve

    chunks = chunk_folder(docs, chunk_words)  # bad input fails before the model loads
    found = retrieve(make_retriever(retriever, chunks), question, top_k, order)
    llm = load_model(opts)
    text = answer_prompt(question, [c for c, _ in found])
    if chat and not llm.tokenizer.chat_template:
        raise LlamalabError("--chat: this model has no chat template; pass --no-chat")
    ids = llm.chat_ids([{"role": "user", "content": text}]) if chat else llm.encode(text + "\nAnswer:")
    for piece in llm.stream(ids, max_new_tokens=max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n\nSources:\n")
    for i, (c, score) in enumerate(found, 1):
        sys.stdout.write(f"  [{i}] {c.source}, chunk {c.index + 1} (score {score:.3f}): {c.text[:80]}...\n")
