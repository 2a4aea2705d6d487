"""Structured output: `response_format` of type `json_object` or `json_schema` by constrained decoding.

Before each token is sampled, a grammar matcher says which tokens may come next, and every other token's
logit is set to -inf; the sampled token is then fed back to the matcher. The output therefore always parses,
and conforms to the schema, unless `max_tokens` cuts it short (finish_reason "length"), as with OpenAI.

Grammar engine: llguidance (the Rust library behind Guidance, also used by vLLM and llama.cpp), which turns
a JSON schema into a grammar and computes token masks on the CPU directly over the model's vocabulary, so
multi-character tokens that straddle JSON syntax are handled exactly. It plugs into the engine through
`SamplingParams.processors` (applied after penalties and logit bias, before temperature and top-k/p).

Approach as in "Efficient Guided Generation for Large Language Models" (Willard & Louf, arXiv:2307.09702):
token-level masking derived from a grammar; llguidance computes the masks with an Earley parser over a
lexer instead of the paper's precompiled FSM index. Unlike OpenAI, the schema is not injected into the
prompt (llama.cpp does the same): ask for JSON in the messages to get good content. JSON is written with
", " and ": " separators and no other whitespace, which keeps small models from looping on whitespace.
Unsupported schema keywords are refused (400), never silently ignored.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from llamalab.errors import LlamalabError
from llamalab.io.tokenizer import Tokenizer

JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarCompiler:
    """Compiles JSON schemas to matchers for one model's vocabulary (the vocabulary index is built once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance

        self.llg = llguidance
        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids) or (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        )
        n_vocab = vocab_size if vocab_size >= tokenizer.vocab_size else None
        try:
            self.tokenizer = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=self.eos or None
            )
        except Exception as e:  # a vocabulary llguidance cannot index: structured output is unavailable
            raise LlamalabError(f"structured output is not available for this tokenizer ({e})") from None

    def compile(self, schema: dict[str, Any] | bool, param: str) -> GrammarTemplate:
        """A template for matchers of `schema`; raises LlamalabError naming `param` if it is unusable."""
        try:
            grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_STYLE)
        except (ValueError, TypeError) as e:
            raise LlamalabError(f"{param}: not a usable JSON schema ({e})") from None
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise LlamalabError(f"{param}: {_first_line(matcher.get_error())}")
        return GrammarTemplate(matcher, self.vocab_size, self.eos)


class GrammarTemplate:
    """A compiled grammar; `processor()` gives a fresh matcher for each sequence (n > 1 needs one each)."""

    def __init__(self, matcher: Any, vocab_size: int, eos: list[int]) -> None:
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self.matcher.deep_copy(), self.vocab_size, self.eos)


class GrammarProcessor:
    """A logits processor f(output_ids, logits) -> logits that masks tokens the grammar does not allow.

    It is stateful: it feeds the matcher the tokens sampled since its last call, so it must serve exactly
    one sequence, called once per step in order (as the engine does)."""

    def __init__(self, matcher: Any, vocab_size: int, eos: list[int]) -> None:
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.consumed = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.consumed :]:
            if not self.matcher.consume_token(token):
                break
        self.consumed = len(output_ids)
        allowed = None if self.matcher.is_error() else self._allowed(logits.shape[-1])
        if allowed is None or not bool(allowed.any()):
            # The matcher broke (it cannot, given its own masks, but never sample from an empty set):
            # end the sequence.
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
            allowed[[t for t in self.eos if t < logits.shape[-1]]] = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _allowed(self, n: int) -> torch.Tensor:
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype="<u4")  # bit i of word w: token 32w+i
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        if len(bits) < n:
            bits = np.concatenate([bits, np.zeros(n - len(bits), dtype=bool)])
        return torch.from_numpy(bits[:n])


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["invalid grammar"])[0][:300]
