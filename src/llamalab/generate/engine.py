"""The generation engine: chunked prefill, decode steps, and a batch whose sequences join and leave between
steps. `generate`, `stream`, the HTTP server and the evaluations' greedy generation all drive this one engine.

Each sequence owns one row of a KV cache built from a `CacheSpec` (dense by default; any registered KV
method). `add` queues a prompt in a free row; each `step` decodes one token for every running sequence in
one batched pass, each row at its own position with its own sampling settings, then prefills queued prompts
in chunks of `prefill_chunk` tokens, so a long prompt joining a running batch delays the others' next token
by one chunk, not by its whole prefill (Sarathi-style chunked prefill, without fusing the chunk into the
decode pass). A prompt is always cut at the same chunk boundaries whatever else runs, so a batched row gives
the result it gives alone. A finished or cancelled sequence frees its row at once.

Prefix reuse: a row remembers the tokens whose keys and values it holds; a new prompt goes to the free row
sharing its longest prefix, and only the rest is prefilled (keys and values at a position depend only on
the tokens before it), where the cache can keep a prefix (`KVCache.keep_prefix`: the dense cache can).

The decode path is chosen when the engine is created and shown in `decode_path`: the native decode step
(`llamalab.generate.native_step`) where the model and cache allow it, else the model's PyTorch forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.generate.detok import DetokenizeStream
from llamalab.generate.native_step import NativeDecoder
from llamalab.generate.sampling import (
    SamplingParams,
    SamplingState,
    TokenLogprobs,
    choose_tokens,
    wait_until_ready,
)
from llamalab.io.tokenizer import Tokenizer
from llamalab.kv.registry import CacheSpec

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    """One request being generated."""

    prompt_ids: list[int]
    params: SamplingParams
    row: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    detok: DetokenizeStream | None = None
    sampling: SamplingState | None = None
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    prefilled: int = 0  # prompt tokens whose keys and values are in the cache
    reused: int = 0  # of those, how many came from the row's previous sequence (prefix reuse)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detok.text if self.detok else ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class StepEvent:
    """What one sequence produced in one engine step."""

    seq: Sequence
    token: int | None
    text: str  # newly visible text (may be empty)
    finished: bool


class Engine:
    """A batch of up to `max_batch` sequences sharing one KV cache of `max_len` positions."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 1,
        max_len: int | None = None,
        eos_token_ids: list[int] | None = None,
        kv: CacheSpec | str | None = None,
        native: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        reuse_prefix: bool = True,
    ) -> None:
        if prefill_chunk < 1:
            raise LlamalabError(f"the prefill chunk must be at least 1 token, not {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.context = config.max_position_embeddings
        self.max_len = min(max_len or self.context, self.context)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device = param.device
        self.kv = CacheSpec.of(kv).check()
        self.cache = self.kv.make(config, self.max_len, max_batch, param.dtype, param.device)
        self.native: NativeDecoder | None = None
        self.decode_path = "pytorch (native step turned off)"
        if native:
            self.native, why = NativeDecoder.create(model, self.cache)
            self.decode_path = "native" if self.native else f"pytorch ({why})"
        self.reuse_prefix = reuse_prefix
        self.eos = set(eos_token_ids or [])
        self.free_rows = list(range(max_batch))
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens each row's cache holds
        self.active: list[Sequence] = []  # every unfinished sequence, prefilling or decoding
        self.prefilling: list[Sequence] = []  # those whose prompt is not all in the cache yet, in order

    # --- admission ------------------------------------------------------------------------------------

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise LlamalabError("the prompt is empty (0 tokens)")
        if n_prompt >= self.max_len:
            raise ContextLengthError(
                f"prompt has {n_prompt} tokens, but the context is {self.max_len}; shorten the prompt"
            )

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue `prompt_ids` in a free row; `step` prefills it and samples its tokens. A sequence asking
        for no tokens comes back already finished."""
        params.validate()
        self.check_fits(len(prompt_ids))
        if not self.free_rows:
            raise LlamalabError("the batch is full")
        seq = Sequence(list(prompt_ids), params)
        seq.detok = DetokenizeStream(self.tokenizer, params.stop)
        seq.sampling = SamplingState.start(params, seq.prompt_ids, self.model.config.vocab_size, self.device)
        if params.max_new_tokens == 0:
            seq.finish_reason = "length"
            return seq
        seq.row, seq.reused = self._take_row(seq.prompt_ids)
        seq.prefilled = seq.reused
        self.active.append(seq)
        self.prefilling.append(seq)
        return seq

    def _take_row(self, prompt: list[int]) -> tuple[int, int]:
        """A free row for `prompt`, and how many of its first tokens that row's cache already holds."""
        best, reuse = self.free_rows[0], 0
        if self.reuse_prefix:
            for row in self.free_rows:
                n = _shared_prefix(self.row_tokens[row], prompt)
                if n > reuse:
                    best, reuse = row, n
        self.free_rows.remove(best)
        if reuse and self.cache.keep_prefix(best, reuse):
            del self.row_tokens[best][reuse:]
            return best, reuse
        self.cache.reset([best])
        self.row_tokens[best] = []
        return best, 0

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (e.g. its client went away) and free its row."""
        if not seq.finished:
            seq.finish_reason = "cancelled"
        if seq in self.active:
            self._retire(seq)

    # --- stepping -------------------------------------------------------------------------------------

    def step(self, decode: bool = True) -> list[StepEvent]:
        """One decode step for every running sequence, then up to `prefill_chunk` tokens of prefill (at
        least one chunk) for queued prompts; a prompt whose prefill completes samples its first token."""
        running = [s for s in self.active if s.output_ids] if decode else []
        # A sequence whose grammar mask is still being computed (on another thread) sits this step out.
        running = [s for s, ok in zip(running, wait_until_ready([s.sampling for s in running])) if ok]
        events = self._decode(running) if running else []
        return events + self._prefill()

    def _prefill(self) -> list[StepEvent]:
        events, budget = [], self.prefill_chunk
        while self.prefilling:
            seq = self.prefilling[0]
            start = seq.prefilled
            # Chunks start at the first uncached position and are prefill_chunk long, whatever else runs.
            end = min(len(seq.prompt_ids), start + self.prefill_chunk)
            if end - start > budget and budget < self.prefill_chunk:
                break
            budget -= end - start
            ids = torch.tensor([seq.prompt_ids[start:end]], device=self.device)
            with torch.inference_mode():
                logits = self.model(ids, start, self.cache, [seq.row], last_only=True)
            seq.prefilled = end
            self.row_tokens[seq.row] = seq.prompt_ids[:end]
            if end == len(seq.prompt_ids):
                self.prefilling.pop(0)
                (token,), (logprobs,) = choose_tokens(logits[:, -1], [seq.sampling], [seq.output_ids])
                events.append(self._accept(seq, token, logprobs))
        return events

    def _decode(self, seqs: list[Sequence]) -> list[StepEvent]:
        tokens = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)  # (B, 1)
        starts = [s.length - 1 for s in seqs]
        rows = [s.row for s in seqs]
        with torch.inference_mode():
            logits = self.native(tokens, starts, rows) if self.native else None
            if logits is None:
                logits = self.model(tokens, starts, self.cache, rows, last_only=True)
        logits = logits[:, -1]  # (B, V)
        for s in seqs:
            self.row_tokens[s.row].append(s.output_ids[-1])
        choice, logprobs = choose_tokens(logits, [s.sampling for s in seqs], [s.output_ids for s in seqs])
        return [self._accept(s, token, lp) for s, token, lp in zip(seqs, choice, logprobs)]

    def _accept(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> StepEvent:
        if logprobs is not None:
            seq.logprobs.append(TokenLogprob(token, *logprobs))
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.output_ids.append(token)
        stop_ids = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos)
        text = ""
        if token in stop_ids:
            seq.finish_reason = "stop"
        else:
            text = seq.detok.push(token)
            if seq.detok.stopped:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.length >= self.max_len:
                seq.finish_reason = "length"
        seq.sampling.observe(token, seq.output_ids, more=not seq.finished)
        if seq.finished:
            text += seq.detok.flush()  # text held back for a stop string that never came (no-op if stopped)
            self._retire(seq)
        return StepEvent(seq, token, text, seq.finished)

    def _retire(self, seq: Sequence) -> None:
        self.active.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq.row >= 0 and seq.row not in self.free_rows:
            self.free_rows.append(seq.row)
            self.free_rows.sort()

    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[StepEvent]:
        """Generate all `prompts` (at most `max_batch`), yielding every event until all are finished."""
        for ids, p in zip(prompts, params):
            seq = self.add(ids, p)
            if seq.finished:
                yield StepEvent(seq, None, "", True)
        while self.active:
            yield from self.step()


def _shared_prefix(held: list[int], prompt: list[int]) -> int:
    """How many first tokens of `prompt` a row holding `held` can reuse (never the last one: its logits are
    needed to sample the first new token)."""
    n, limit = 0, min(len(held), len(prompt) - 1)
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n
