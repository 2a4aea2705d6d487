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

What a schema may cost is bounded, because the engine thread decodes every client's tokens: a schema is at
most `MAX_SCHEMA_BYTES` of JSON, one that no answer within the context could satisfy (a `minLength` longer
than the context can hold, a `$ref` that only refers to itself) is refused before it runs, and compiling
happens on the request's own thread, one schema at a time. Token masks are computed on a grammar thread
(llguidance releases the GIL meanwhile): the mask for a sequence's next token starts as soon as its last
token is known, and a sequence whose mask is not ready when a decode step starts sits that step out, so a
schema whose masks are slow to compute slows its own answer, not the other streams.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from llamalab.errors import LlamalabError
from llamalab.io.tokenizer import Tokenizer

JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
MAX_SCHEMA_BYTES = 32 * 1024
# Keywords whose value is a least size; one larger than an answer can be makes the output always cut short.
_LEAST_SIZES = ("minLength", "minItems", "minProperties", "minContains")
_DATA = ("const", "default", "enum", "examples")  # values, not schemas: not searched for least sizes
_NAME_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema
_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def grammar_thread() -> ThreadPoolExecutor:
    """The one thread that computes token masks (one, so grammars never take more than one core)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamalab-grammar")
        return _worker


class GrammarCompiler:
    """Compiles JSON schemas to matchers for one model's vocabulary (the vocabulary index is built once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance

        self.llg = llguidance
        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids) or (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        )
        self.lock = threading.Lock()
        # No token is longer than this many characters (byte-level and SentencePiece pieces alike).
        self.longest_token = max(len(piece) for piece in tokenizer.backend.get_vocab())
        n_vocab = vocab_size if vocab_size >= tokenizer.vocab_size else None
        try:
            self.tokenizer = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=self.eos or None
            )
        except Exception as e:  # a vocabulary llguidance cannot index: structured output is unavailable
            raise LlamalabError(f"structured output is not available for this tokenizer ({e})") from None

    def compile(self, schema: dict[str, Any] | bool, param: str, max_tokens: int) -> GrammarTemplate:
        """A template for matchers of `schema`, for answers of at most `max_tokens` tokens; raises
        LlamalabError naming `param` if it is unusable."""
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise LlamalabError(
                f"{param} is {len(text)} bytes of JSON; at most {MAX_SCHEMA_BYTES} are allowed"
            )
        _check_least_sizes(schema, param, max_tokens, max_tokens * self.longest_token)
        with self.lock:  # one compilation at a time: each can take a core for a while
            try:
                grammar = self.llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_STYLE)
            except (ValueError, TypeError) as e:
                raise LlamalabError(f"{param}: not a usable JSON schema ({e})") from None
            matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
            first = matcher.compute_bitmask()  # the first token's mask, shared by every sequence
        if matcher.is_error():
            error = _first_line(matcher.get_error())
            if error == "NoExtensionBias":  # nothing can be generated at all
                error = (
                    "the schema admits no JSON value that can be written (a $ref that only refers to itself?)"
                )
            raise LlamalabError(f"{param}: {error}")
        return GrammarTemplate(matcher, self.vocab_size, self.eos, first)


def _check_least_sizes(schema: Any, param: str, max_tokens: int, max_chars: int) -> None:
    """Refuse a least size (minLength, minItems, ...) that no answer of `max_chars` characters can reach."""
    stack = [(schema, param, False)]  # (value, where, whether its keys are names rather than keywords)
    while stack:
        value, path, names = stack.pop()
        if isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", False) for i, v in enumerate(value))
        elif isinstance(value, dict):
            for key, v in value.items():
                least = not names and key in _LEAST_SIZES and isinstance(v, int | float)
                if least and not isinstance(v, bool) and v > max_chars:
                    raise LlamalabError(
                        f"{path}.{key} is {v}, but an answer within the context ({max_tokens} tokens) has at "
                        f"most {max_chars} characters"
                    )
                if names or key not in _DATA:
                    stack.append((v, f"{path}.{key}", not names and key in _NAME_MAPS))


class GrammarTemplate:
    """A compiled grammar; `processor()` gives a fresh matcher for each sequence (n > 1 needs one each)."""

    def __init__(self, matcher: Any, vocab_size: int, eos: list[int], first_mask: bytes) -> None:
        self.matcher, self.vocab_size, self.eos, self.first_mask = matcher, vocab_size, eos, first_mask

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self.matcher.deep_copy(), self.vocab_size, self.eos, self.first_mask)


class GrammarProcessor:
    """A logits processor f(output_ids, logits) -> logits that masks tokens the grammar does not allow.

    It is stateful: it feeds the matcher the tokens generated since it last saw `output_ids`, so it must serve
    exactly one sequence, in order (as the engine does). `prepare(output_ids)` starts the next mask on the
    grammar thread; `ready()` says whether it is done; a call uses it (or computes it then)."""

    def __init__(
        self, matcher: Any, vocab_size: int, eos: list[int], first_mask: bytes | None = None
    ) -> None:
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.consumed = 0
        self.failure: str | None = None  # why the grammar gave up partway (the answer then ends at once)
        self.pending: Future | None = None
        if first_mask is not None:
            self.pending = Future()
            self.pending.set_result(first_mask)

    def prepare(self, output_ids: list[int]) -> None:
        new, self.consumed = list(output_ids[self.consumed :]), len(output_ids)
        self.pending = grammar_thread().submit(self._advance, new)

    def ready(self) -> bool:
        return self.pending is None or self.pending.done()

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.pending is None or self.consumed != len(output_ids):
            self.prepare(output_ids)
        mask, self.pending = self.pending.result(), None
        allowed = None if mask is None else self._allowed(mask, logits.shape[-1])
        if allowed is None or not bool(allowed.any()):
            # The grammar engine gave up (a limit on its work, met deep in a large schema; or a bug): never
            # sample from an empty set, end the sequence, and say why, so the answer is not taken as valid.
            error = _first_line(self.matcher.get_error()) if self.matcher.is_error() else "no token allowed"
            self.failure = (
                f"response_format: the grammar engine gave up after {len(output_ids)} tokens ({error}); "
                "the answer would not be valid JSON, simplify the schema"
            )
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
            allowed[[t for t in self.eos if t < logits.shape[-1]]] = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _advance(self, tokens: list[int]) -> bytes | None:
        """On the grammar thread: consume `tokens`, then the mask for the next one (None if broken)."""
        for token in tokens:
            if not self.matcher.consume_token(token):
                break
        return None if self.matcher.is_error() else self.matcher.compute_bitmask()

    @staticmethod
    def _allowed(mask: bytes, n: int) -> torch.Tensor:
        words = np.frombuffer(mask, dtype="<u4")  # bit i of word w: token 32w+i
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        if len(bits) < n:
            bits = np.concatenate([bits, np.zeros(n - len(bits), dtype=bool)])
        return torch.from_numpy(bits[:n])


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["invalid grammar"])[0][:300]
