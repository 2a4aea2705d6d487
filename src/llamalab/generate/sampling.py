"""Sampling settings and the logits-to-token step, for a whole batch at once.

Order of operations (transformers' processor order, with OpenAI's penalties added): repetition penalty
(prompt + output, HF semantics: divide positive logits, multiply negative ones) -> presence / frequency
penalties (output tokens only, OpenAI semantics) -> logit bias -> extra processors (a grammar mask) ->
temperature -> top-k -> top-p -> min-p -> sample. Temperature 0 is greedy (argmax of the penalised logits).

The engine thread decodes every request in the batch, so nothing here may cost more per token for a larger
request: penalties and biases are tensor operations over the batch's (B, V) logits, fed by per-sequence
state that is updated in O(1) per token (`SamplingState`), never rebuilt from the prompt and answer; a
row's sampling and log-probabilities are vector operations over its vocabulary. Each row is computed from
its own logits, settings and generator only, so a sequence's tokens do not depend on what else is in the
batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llamalab.errors import LlamalabError

# How long a decode step waits for grammar masks computed on another thread before leaving the rows whose
# mask is not ready for the next step (the rest of the batch goes ahead without them).
MASK_GRACE_S = 0.002

TokenLogprobs = tuple[float, list[tuple[int, float]]]  # the chosen token's logprob, the top alternatives


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
    # applied after penalties and bias, before temperature/top-k/top-p/min-p. A processor may also have
    # `prepare(output_ids)` (start its work for the next token, e.g. on another thread) and `ready()`.
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


@dataclass
class SamplingState:
    """What one sequence's sampling needs besides its logits, kept up to date token by token."""

    params: SamplingParams
    generator: torch.Generator
    seen: torch.Tensor | None = None  # (V,) bool: prompt and output tokens (repetition penalty)
    counts: torch.Tensor | None = None  # (V,) fp32: output tokens (presence and frequency penalties)
    bias_ids: torch.Tensor | None = None  # logit_bias as (ids, values), built once
    bias_values: torch.Tensor | None = None

    @classmethod
    def start(
        cls,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingState:
        state = cls(params, make_generator(params.seed, "cpu"))
        if params.repetition_penalty != 1.0:
            state.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            state.seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            state.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < vocab_size}
        if bias:
            state.bias_ids = torch.tensor(list(bias), dtype=torch.long, device=device)
            state.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
        return state

    def observe(self, token: int, output_ids: list[int], more: bool = True) -> None:
        """`token` was generated (it is the last of `output_ids`); with `more`, prepare the next one."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if more:
            for processor in self.params.processors:
                prepare = getattr(processor, "prepare", None)
                if prepare is not None:
                    prepare(output_ids)

    def ready(self) -> bool:
        """Whether every processor can give its answer for the next token without waiting."""
        return all(getattr(p, "ready", _always)() for p in self.params.processors)


def _always() -> bool:
    return True


def wait_until_ready(states: list[SamplingState], grace_s: float = MASK_GRACE_S) -> list[bool]:
    """Which sequences can take part in the next decode step. Work a processor does on another thread (a
    grammar mask) gets `grace_s` to finish; a sequence whose work takes longer sits out the step, so one slow
    grammar does not hold up the batch. Waits for at least one sequence, so a step never comes back empty."""
    deadline = time.monotonic() + grace_s
    ready = [s.ready() for s in states]
    while not all(ready) and (time.monotonic() < deadline or not any(ready)):
        time.sleep(0.0001)  # releases the GIL to the processors' thread
        ready = [s.ready() for s in states]
    return ready


def penalize(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Repetition, presence and frequency penalties and logit bias for a batch: (B, V) -> new fp32 (B, V)."""
    out = logits.float().clone()
    rows = [i for i, s in enumerate(states) if s.seen is not None]
    if rows:
        idx = torch.tensor(rows, device=out.device)
        seen = torch.stack([states[i].seen for i in rows])
        penalty = _column([states[i].params.repetition_penalty for i in rows], out)
        x = out[idx]
        out[idx] = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    rows = [i for i, s in enumerate(states) if s.counts is not None]
    if rows:
        idx = torch.tensor(rows, device=out.device)
        counts = torch.stack([states[i].counts for i in rows])
        presence = _column([states[i].params.presence_penalty for i in rows], out)
        frequency = _column([states[i].params.frequency_penalty for i in rows], out)
        out[idx] -= presence * (counts > 0) + frequency * counts
    rows = [i for i, s in enumerate(states) if s.bias_ids is not None]
    if rows:
        ids = torch.cat([states[i].bias_ids for i in rows])
        values = torch.cat([states[i].bias_values for i in rows])
        row_of = torch.cat([torch.full_like(states[i].bias_ids, i) for i in rows])
        out.index_put_((row_of, ids), values, accumulate=True)
    return out


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def needs_full_sort(params: SamplingParams, vocab_size: int) -> bool:
    """Top-p without top-k ranks the whole vocabulary."""
    return not params.greedy and params.top_p < 1.0 and not 0 < params.top_k < vocab_size


def rank(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R, V) of processed logits divided by their temperatures, sorted most likely first: (values,
    ids). One sort for all rows that need one runs on every thread, where one sort per row runs on one;
    it is stable, so a row's order is the same whatever else is sorted with it."""
    temperature = _column([p.temperature for p in params], logits)
    return torch.sort(logits / temperature, dim=-1, descending=True, stable=True)


def sampling_candidates(
    logits: torch.Tensor,
    params: SamplingParams,
    ranked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p and min-p on one row's processed logits (V,).

    Returns (values, ids): the logits (divided by the temperature) of the tokens that may be sampled and
    their token ids, most likely first; or (values over the whole vocabulary, None) when no filter needs
    the order (removed tokens are -inf). Without a full sort unless top-p needs one and top-k is off;
    `ranked` is that sort (this row of `rank`), when it was done for the batch at once."""
    x, ids = logits, None
    if params.top_k and params.top_k < x.shape[-1]:
        x = x / params.temperature
        top, ids = torch.topk(x, params.top_k)
        if torch.isinf(top[-1]):  # fewer than k tokens allowed at all (a grammar mask): keep those
            n = max(1, int(torch.isfinite(top).sum()))
            top, ids = top[:n], ids[:n]
        else:  # keep every token tied with the k-th, as transformers does (bf16 logits tie often)
            tied = int((x >= top[-1]).sum())
            if tied > params.top_k:
                top, ids = torch.topk(x, tied)
        x = top
    elif params.top_p < 1.0:
        x, ids = ranked if ranked is not None else rank(x[None], [params])
        x, ids = x.reshape(-1), ids.reshape(-1)
    else:
        x = x / params.temperature
    if params.top_p < 1.0:
        # transformers' rule: drop the least likely tokens whose total probability is <= 1 - top_p,
        # summed from the least likely up; the most likely token always stays.
        ascending = x.flip(0).softmax(-1).cumsum(0)
        drop = int((ascending <= 1 - params.top_p).sum())
        keep = max(1, len(x) - drop)
        x, ids = x[:keep], ids[:keep]
    if params.min_p > 0:
        probs = x.softmax(-1)
        keep = probs >= params.min_p * probs.max()
        if ids is None:
            x = x.masked_fill(~keep, float("-inf"))
        else:
            n = int(keep.sum())  # the values are sorted, so the kept ones come first
            x, ids = x[:n], ids[:n]
    return x, ids


def sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    ranked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> int:
    """One token id drawn from one row's processed logits (V,) with the sequence's own generator."""
    values, ids = sampling_candidates(logits, params, ranked)
    pick = int(torch.multinomial(values.softmax(-1), 1, generator=generator))
    return pick if ids is None else int(ids[pick])


def choose_tokens(
    logits: torch.Tensor, states: list[SamplingState], outputs: list[list[int]]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The next token of every row of a batch's logits (B, V), and its log-probabilities where asked.

    `outputs[i]` are row i's tokens so far (for processors). Log-probabilities are those of the model's raw
    distribution (before penalties and sampling filters), as OpenAI reports them."""
    params = [s.params for s in states]
    if all(p.plain_greedy for p in params):
        tokens = logits.argmax(-1).tolist()  # one batched argmax: nothing changes the logits
    else:
        processed = penalize(logits, states)
        for i, p in enumerate(params):
            for processor in p.processors:
                processed[i] = processor(outputs[i], processed[i])
        tokens = [0] * len(states)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            for i, t in zip(greedy, processed[greedy].argmax(-1).tolist()):
                tokens[i] = t
        sort = [i for i, p in enumerate(params) if needs_full_sort(p, processed.shape[-1])]
        values, ids = rank(processed[sort], [params[i] for i in sort]) if sort else (None, None)
        ranked = {i: (values[j], ids[j]) for j, i in enumerate(sort)}
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = sample_row(processed[i], p, states[i].generator, ranked.get(i))
    return tokens, token_logprobs(logits, tokens, params)


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """For each row that asks for them: its token's log-probability and its `logprobs` most likely tokens."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), -1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device)).squeeze(1).tolist()
    for j, i in enumerate(rows):
        k = params[i].logprobs
        values, ids = torch.topk(lp[j], k) if k else (lp.new_empty(0), lp.new_empty(0, dtype=torch.long))
        out[i] = (chosen[j], list(zip(ids.tolist(), values.tolist())))
    return out
