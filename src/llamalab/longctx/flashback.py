"""FlashBack: retrieved text appended after the context, so the context's KV cache is reused.

Paper: "FlashBack: Efficient Retrieval-Augmented Language Modeling for Long Context Inference", Liu et al.,
arXiv 2405.04065 (ACL Findings 2025). In-context retrieval-augmented LMs (In-Context RALM, arXiv 2302.00083)
retrieve every `stride` generated tokens with the last tokens as the query and *prepend* the document, so the
whole input is prefilled again at each retrieval. FlashBack *appends* it instead, between two marking tokens,
after the input: the input's keys and values stay valid and only the new tokens and the document are computed.

Here both patterns run on the generation engine: each retrieval step is a new prompt for the same engine
row, and the engine's prefix reuse (`KVCache.keep_prefix`) keeps the cached rows the prompt shares with the
previous one. Appending, that shared prefix is the whole input; prepending, it is nothing (another document
leads). Reproduced: the appending pattern, the retrieval stride, KV reuse, and the speed comparison. Not
reproduced (they need training, which comes with the training work): the two trainable marking-token
embeddings and the LoRA that adapts the model to the appended pattern; the marks here are the plain-text
`<MARK_L>` / `<MARK_R>` strings, so quality under appending is that of the untuned model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llamalab.errors import LlamalabError
from llamalab.generate.sampling import SamplingParams

MARK_L, MARK_R = "<MARK_L>", "<MARK_R>"
MODES = ("append", "prepend")


@dataclass
class RALMResult:
    tokens: list[int]
    seconds: float
    retrievals: int
    prefilled: int  # prompt tokens computed (not reused) over all retrievals
    reused: int  # prompt tokens whose keys/values came from the cache
    steps: list[dict] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / max(len(self.tokens), 1)


class RetrievalLM:
    """Greedy generation with a retrieval every `stride` tokens; `retrieve(query_ids) -> doc_ids`."""

    def __init__(self, llm, retrieve: Callable[[list[int]], list[int]], mode: str = "append", stride: int = 16,
                 query_tokens: int = 32, max_len: int | None = None) -> None:  # fmt: skip
        if mode not in MODES:
            raise LlamalabError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if stride < 1:
            raise LlamalabError(f"the retrieval stride must be at least 1 token, got {stride}")
        self.llm, self.retrieve, self.mode, self.stride, self.query_tokens = (
            llm,
            retrieve,
            mode,
            stride,
            query_tokens,
        )
        self.marks = (
            llm.encode(MARK_L, add_special_tokens=False),
            llm.encode(MARK_R, add_special_tokens=False),
        )
        self.engine = llm.engine(max_batch=1, max_len=max_len)  # one row, reused from prompt to prompt

    def prompt(self, x: list[int], doc: list[int]) -> list[int]:
        if self.mode == "prepend":
            return doc + x
        return x + self.marks[0] + doc + self.marks[1]

    def generate(self, context: list[int], max_new_tokens: int) -> RALMResult:
        out: list[int] = []
        result = RALMResult(out, 0.0, 0, 0, 0)
        t0 = time.perf_counter()
        while len(out) < max_new_tokens:
            x = context + out
            doc = self.retrieve(x[-self.query_tokens :])
            prompt = self.prompt(x, doc)
            n = min(self.stride, max_new_tokens - len(out))
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            seq = None
            for event in self.engine.run([prompt], [params]):
                seq = event.seq
            out += seq.output_ids
            result.retrievals += 1
            result.prefilled += len(prompt) - seq.reused
            result.reused += seq.reused
            result.steps.append({"prompt": len(prompt), "reused": seq.reused, "row": seq.row})
        result.seconds = time.perf_counter() - t0
        return result
