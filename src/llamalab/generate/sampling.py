"""Sampling settings and the logits-to-token step.

Order of operations, per row (transformers' processor order, with OpenAI's penalties added):
repetition penalty (prompt + output, HF semantics: divide positive logits, multiply negative ones) ->
presence / frequency penalties (output tokens only, OpenAI semantics) -> logit bias -> temperature ->
top-k -> top-p -> min-p -> sample. Temperature 0 is greedy (argmax of the penalised logits).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llamalab.errors import LlamalabError


@dataclass
class SamplingParams:
    """How one sequence is decoded. Defaults are greedy, 128 new tokens."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (never part of the returned text)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS ids
    ignore_eos: bool = False
    logprobs: int | None = None  # record the chosen token's logprob and this many alternatives
    # Extra logits processors, e.g. a grammar mask for constrained decoding: f(output_ids, logits) -> logits,
    # applied after penalties and bias, before temperature/top-k/top-p/min-p.
    processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] = field(default_factory=list)

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamalabError(message)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the whole batch can share one argmax."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and not self.presence_penalty
            and not self.frequency_penalty
            and not self.logit_bias
            and not self.processors
        )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def process_logits(
    logits: torch.Tensor, params: SamplingParams, context: list[int], n_prompt: int
) -> torch.Tensor:
    """Apply penalties and bias to one row's logits (V,) in fp32; returns a new tensor."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and context:
        idx = torch.tensor(sorted(set(context)), device=logits.device)
        picked = logits[idx]
        logits[idx] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if params.presence_penalty or params.frequency_penalty:
        counts = Counter(context[n_prompt:])
        if counts:
            idx = torch.tensor(list(counts), device=logits.device)
            n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[idx] -= params.presence_penalty + params.frequency_penalty * n
    for token, bias in params.logit_bias.items():
        if 0 <= token < logits.shape[-1]:
            logits[token] += bias
    for processor in params.processors:
        logits = processor(context[n_prompt:], logits)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on processed logits (V,); filtered entries become -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - params.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from processed logits (V,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = warp(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the k most likely alternatives, under the model's raw
    distribution (before penalties and sampling filters)."""
    lp = torch.log_softmax(logits.float(), -1)
    alts = []
    if k:
        values, ids = torch.topk(lp, k)
        alts = [(int(i), float(v)) for i, v in zip(ids, values)]
    return float(lp[token]), alts
