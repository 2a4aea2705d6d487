"""The generation engine: prefill, decode steps, and a batch whose sequences join and leave between steps.

Each sequence owns one row of a preallocated KV cache. `add` prefills the prompt into a free row on its own
(so its logits are exactly those of an unbatched run); `step` decodes one token for every active sequence
in a single batched forward pass, each row at its own position and with its own sampling settings. A
finished or cancelled sequence frees its row at once. `generate`, `stream` and the HTTP server all drive
this one engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.generate.detok import DetokenizeStream
from llamalab.generate.sampling import (
    SamplingParams,
    make_generator,
    process_logits,
    sample_token,
    top_logprobs,
)
from llamalab.io.tokenizer import Tokenizer
from llamalab.kv.base import KVCache
from llamalab.kv.dense import DenseCache

CacheFactory = Callable[[int, int], KVCache]  # (max_batch, max_len) -> cache


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
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

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
        cache_factory: CacheFactory | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.context = config.max_position_embeddings
        self.max_len = min(max_len or self.context, self.context)
        self.max_batch = max_batch
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.device = device
        if cache_factory is None:

            def cache_factory(b, n):
                return DenseCache.for_model(config, n, b, dtype=dtype, device=device)

        self.cache = cache_factory(max_batch, self.max_len)
        self.eos = set(eos_token_ids or [])
        self.free_rows = list(range(max_batch))
        self.active: list[Sequence] = []

    # --- admission ------------------------------------------------------------------------------------

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise LlamalabError("the prompt is empty (0 tokens)")
        if n_prompt >= self.max_len:
            raise ContextLengthError(
                f"prompt has {n_prompt} tokens, but the context is {self.max_len}; shorten the prompt"
            )

    def add(self, prompt_ids: list[int], params: SamplingParams) -> tuple[Sequence, StepEvent]:
        """Prefill `prompt_ids` into a free row and sample the first token."""
        params.validate()
        self.check_fits(len(prompt_ids))
        if not self.free_rows:
            raise LlamalabError("the batch is full")
        seq = Sequence(list(prompt_ids), params)
        seq.row = self.free_rows.pop(0)
        seq.detok = DetokenizeStream(self.tokenizer, params.stop)
        seq.generator = make_generator(params.seed, "cpu")
        self.cache.reset([seq.row])
        if params.max_new_tokens == 0:
            seq.finish_reason = "length"
            self._release(seq)
            return seq, StepEvent(seq, None, "", True)
        ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(ids, 0, self.cache, rows=[seq.row], last_only=True)[0, -1]  # (V,)
        self.active.append(seq)
        return seq, self._accept(seq, logits)

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (e.g. its client went away) and free its row."""
        if not seq.finished:
            seq.finish_reason = "cancelled"
        if seq in self.active:
            self.active.remove(seq)
            self._release(seq)

    # --- decoding -------------------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """One decode step for every active sequence."""
        if not self.active:
            return []
        seqs = list(self.active)
        tokens = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)  # (B, 1)
        starts = [s.length - 1 for s in seqs]
        with torch.inference_mode():
            logits = self.model(tokens, starts, self.cache, rows=[s.row for s in seqs], last_only=True)[:, -1]
        if all(s.params.plain_greedy and s.params.logprobs is None for s in seqs):
            choice = logits.argmax(-1).tolist()  # one batched argmax instead of a loop over rows
            return [self._accept(s, logits[i], token=choice[i]) for i, s in enumerate(seqs)]
        return [self._accept(s, logits[i]) for i, s in enumerate(seqs)]

    def _accept(self, seq: Sequence, logits: torch.Tensor, token: int | None = None) -> StepEvent:
        if token is None:
            p = seq.params
            context = seq.prompt_ids + seq.output_ids
            processed = logits if p.plain_greedy else process_logits(logits, p, context, len(seq.prompt_ids))
            token = sample_token(processed, p, seq.generator)
            if p.logprobs is not None:
                lp, alts = top_logprobs(logits, token, p.logprobs)
                seq.logprobs.append(TokenLogprob(token, lp, alts))
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
        if seq.finished:
            text += seq.detok.flush()  # text held back for a stop string that never came (no-op if stopped)
            self.active.remove(seq)
            self._release(seq)
        return StepEvent(seq, token, text, seq.finished)

    def _release(self, seq: Sequence) -> None:
        if seq.row >= 0 and seq.row not in self.free_rows:
            self.free_rows.append(seq.row)
            self.free_rows.sort()

    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[StepEvent]:
        """Generate all `prompts` (at most `max_batch`), yielding every event until all are finished."""
        for ids, p in zip(prompts, params):
            yield self.add(ids, p)[1]
        while self.active:
            yield from self.step()
