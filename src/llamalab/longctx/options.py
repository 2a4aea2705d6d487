"""`--xl3m` and `--rag`: options that replace a too-long prompt by a shorter one before generation, for
`generate` and the generating evaluations (`eval passkey`, `eval needle`).

`@reducer_options` adds the options to a typer command and hands them over as one `reduce: ReduceOptions`
argument; `ReduceOptions.make(llm)` builds the reducer (`XL3MReducer` or `RAGReducer`), a callable
`(prompt_ids, max_new_tokens) -> prompt_ids` that `Forward.greedy` and `generate` apply.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from llamalab.errors import LlamalabError


@dataclass
class ReduceOptions:
    xl3m: bool = False
    xl3m_segment: int = 512
    xl3m_question: int = 8
    xl3m_key_len: int | None = None
    xl3m_scorer: str = "entropy"
    rag: str | None = None  # bm25 | dense
    rag_top_k: int = 5
    rag_chunk_words: int = 300
    rag_order: str = "document"

    def make(self, llm) -> Callable[[list[int], int], list[int]] | None:
        if self.xl3m and self.rag:
            raise LlamalabError("--xl3m and --rag each replace the prompt; choose one")
        if self.xl3m:
            from llamalab.longctx.xl3m import XL3MConfig, XL3MReducer

            config = XL3MConfig(self.xl3m_segment, self.xl3m_question, self.xl3m_key_len, self.xl3m_scorer)
            return XL3MReducer(llm, config)
        if self.rag:
            from llamalab.longctx.rag import RAGReducer

            if self.rag_top_k < 1 or self.rag_chunk_words < 1:
                raise LlamalabError("--rag-top-k and --rag-chunk-words must be at least 1")
            return RAGReducer(
                llm, self.rag, self.rag_top_k, self.rag_chunk_words, self.rag_order, self.xl3m_question
            )
        return None

    def settings(self) -> dict[str, Any]:
        if self.xl3m:
            return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith("xl3m")}
        if self.rag:
            return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith("rag")}
        return {}


def _parameters() -> list[inspect.Parameter]:
    import typer

    def opt(name: str, annotation: Any, default: Any, flag: str, help: str) -> inspect.Parameter:
        info = typer.Option(flag, help=help, rich_help_panel="Long context")
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, info]
        )

    return [
        opt("xl3m", bool, False, "--xl3m", "XL3M: answer from the segments most relevant to the question."),
        opt("xl3m_segment", int, 512, "--xl3m-segment", "XL3M segment length in tokens."),
        opt("xl3m_question", int, 8, "--xl3m-question", "Tokens at the prompt's end taken as the question."),
        opt("xl3m_key_len", int | None, None, "--xl3m-key-len",
            "Key context budget with the question (default: the trained length minus new tokens)."),
        opt("xl3m_scorer", str, "entropy", "--xl3m-scorer", "Segment relevance: entropy (certainty) or nll."),
        opt("rag", str | None, None, "--rag", "Retrieve from the prompt instead of reading it all: bm25 or dense."),
        opt("rag_top_k", int, 5, "--rag-top-k", "Chunks kept (Retrieval-meets-Long-Context: 5)."),
        opt("rag_chunk_words", int, 300, "--rag-chunk-words", "Words per chunk (300)."),
        opt("rag_order", str, "document", "--rag-order", "Kept chunks in document or score order."),
    ]  # fmt: skip


_NAMES = [f.name for f in dataclasses.fields(ReduceOptions)]


def reducer_options(fn: Callable[..., Any]) -> Any:
    """Decorate a typer command taking `reduce: ReduceOptions`: it gets the `--xl3m*` / `--rag*` options."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for n, p in sig.parameters.items()
        if n != "reduce"
    ]
    keyword_start = next((i for i, p in enumerate(own) if p.kind == inspect.Parameter.KEYWORD_ONLY), len(own))
    params = own[:keyword_start] + _parameters() + own[keyword_start:]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _NAMES if name in kwargs}
        return fn(*args, **kwargs, reduce=ReduceOptions(**values))

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__
    return wrapper
