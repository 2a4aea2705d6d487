"""From a validated OpenAI request to what the engine runs: prompt ids and `SamplingParams` per choice.

Defaults follow OpenAI (temperature 1, top_p 1; `max_tokens` 16 for completions, the rest of the context
for chat), except that sampling settings the model's authors ship (`generation_config.json`: temperature,
top_p, top_k) replace OpenAI's defaults, as vLLM does. `max_tokens` larger than the whole context is a 400;
otherwise it is capped by the room the prompt leaves (the answer then ends with finish_reason "length").
With `n` > 1 and a `seed`, choice i uses seed + i, so the choices differ but the request is reproducible.

Sizes are bounded so that the largest request costs the engine thread no more per token than a small one:
at most `MAX_LOGIT_BIAS` logit_bias entries (OpenAI's limit), `MAX_STOP` stop strings of at most
`MAX_STOP_CHARS` characters, and JSON schemas as `constrained` bounds them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.generate.sampling import SamplingParams
from llamalab.generate.stops import StopStrings
from llamalab.serve.errors import bad_request
from llamalab.serve.schemas import ChatRequest, CompletionRequest, parse_response_format
from llamalab.serve.state import ServerState

MAX_STOP = 16
MAX_STOP_CHARS = 1000
MAX_LOGIT_BIAS = 300
_TOKEN_ID = re.compile(r"0|[1-9][0-9]*")  # int() would also take spaces, signs, "_" and non-ASCII digits


@dataclass
class Plan:
    kind: str  # "chat" | "completion"
    prompts: list[list[int]]  # one per choice
    params: list[SamplingParams]  # one per choice
    prompt_tokens: int  # for usage: each distinct prompt counted once
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False


def chat_plan(state: ServerState, req: ChatRequest, prompt_ids: list[int]) -> Plan:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs: true", "top_logprobs")
    max_tokens, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    base = _base_params(state, req, (req.top_logprobs or 0) if req.logprobs else None)
    check_prompt(state, prompt_ids, "messages")
    base.max_new_tokens = _max_new(state, max_tokens, param, len(prompt_ids))
    return _expand(state, "chat", req, [(prompt_ids, base)], req.logprobs)


def completion_plan(state: ServerState, req: CompletionRequest) -> Plan:
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    base = _base_params(state, req, req.logprobs)
    pairs = []
    for ids in completion_prompts(state, req.prompt):
        check_prompt(state, ids, "prompt")
        p = _copy(base)
        p.max_new_tokens = _max_new(
            state, 16 if req.max_tokens is None else req.max_tokens, "max_tokens", len(ids)
        )
        pairs.append((ids, p))
    return _expand(state, "completion", req, pairs, req.logprobs is not None)


def completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """`prompt` (a string, strings, token ids, or lists of token ids) as token-id lists."""
    llm = state.llm
    if isinstance(prompt, str):
        return [llm.encode(prompt)]
    if not prompt:
        raise bad_request("prompt must not be an empty list", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [llm.encode(p) for p in prompt]
    batch = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    vocab = llm.config.vocab_size
    for ids in batch:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
    return [list(ids) for ids in batch]


def check_prompt(state: ServerState, ids: list[int], param: str) -> None:
    try:
        state.scheduler.engine.check_fits(len(ids))
    except ContextLengthError:
        raise bad_request(
            f"the prompt has {len(ids)} tokens, but the model context is {state.ctx}; shorten it",
            param,
            "context_length_exceeded",
        ) from None
    except LlamalabError as e:
        raise bad_request(str(e), param) from None


def _max_new(state: ServerState, requested: int | None, param: str, n_prompt: int) -> int:
    room = state.ctx - n_prompt
    if requested is None:
        return room
    if requested < 1:
        raise bad_request(f"{param} must be at least 1, not {requested}", param)
    if requested > state.ctx:
        raise bad_request(
            f"{param} is {requested}, more than the model context ({state.ctx} tokens)",
            param,
            "context_length_exceeded",
        )
    return min(requested, room)


def _base_params(
    state: ServerState, req: ChatRequest | CompletionRequest, logprobs: int | None
) -> SamplingParams:
    defaults = _generation_defaults(state)
    stop = _stop_strings(req.stop)
    temperature = _pick(req.temperature, defaults.get("temperature"), 1.0)
    params = SamplingParams(
        # Below 1e-5 the division by the temperature overflows; it means greedy anyway (as in vLLM).
        temperature=0.0 if temperature < 1e-5 else temperature,
        top_p=_pick(req.top_p, defaults.get("top_p"), 1.0),
        top_k=_pick(req.top_k, defaults.get("top_k"), 0),
        min_p=_pick(req.min_p, None, 0.0),
        repetition_penalty=_pick(req.repetition_penalty, None, 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(state, req.logit_bias),
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )
    try:
        params.validate()
    except LlamalabError as e:
        raise bad_request(str(e)) from None
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    return params


def _expand(
    state: ServerState, kind: str, req: Any, pairs: list[tuple[list[int], SamplingParams]], logprobs: bool
) -> Plan:
    """n choices of each prompt, each with its own seed and (for structured output) grammar matcher."""
    if req.n > state.config.max_batch:
        raise bad_request(f"n is {req.n}, more than this server's batch ({state.config.max_batch})", "n")
    _check_capacity(state, len(pairs) * req.n)
    fmt, schema = parse_response_format(req.response_format)
    template = None
    if fmt != "text":
        template = _grammar(state, {"type": "object"} if fmt == "json_object" else schema)
    prompts, params = [], []
    for ids, base in pairs:
        for i in range(req.n):
            p = _copy(base)
            if base.seed is not None:
                p.seed = (base.seed + i) % 2**64  # torch seeds are 64-bit
            if template is not None:
                p.processors = [template.processor()]
            prompts.append(ids)
            params.append(p)
    return Plan(
        kind,
        prompts,
        params,
        sum(len(ids) for ids, _ in pairs),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=logprobs,
    )


def _grammar(state: ServerState, schema: Any) -> Any:
    if state.grammar is None:
        raise bad_request(state.grammar_error or "structured output is not available", "response_format")
    try:
        return state.grammar.compile(schema, "response_format.json_schema.schema", state.ctx)
    except LlamalabError as e:
        raise bad_request(str(e), "response_format") from None


def _check_capacity(state: ServerState, n_sequences: int) -> None:
    room = state.config.max_batch + state.config.max_queue
    if n_sequences > room:
        raise bad_request(
            f"the request needs {n_sequences} sequences; this server holds at most {room} at once", "n"
        )


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    too_long = next((i for i, s in enumerate(stop) if len(s) > MAX_STOP_CHARS), None)
    if too_long is not None:
        raise bad_request(
            f"stop[{too_long}] has {len(stop[too_long])} characters; at most {MAX_STOP_CHARS} are allowed",
            "stop",
        )
    stop = [s for s in stop if s]
    StopStrings.build(tuple(stop))  # built here, off the engine thread; the engine finds it cached
    return stop


def _logit_bias(state: ServerState, bias: dict[str, float] | None) -> dict[int, float]:
    bias = bias or {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(
            f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed", "logit_bias"
        )
    out = {}
    vocab = state.llm.config.vocab_size
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key):
            raise bad_request(
                f"logit_bias: key {json.dumps(key)[:40]} is not a token id (a decimal number)", "logit_bias"
            )
        token = int(key)
        if not 0 <= token < vocab:
            raise bad_request(
                f"logit_bias: token id {token} is outside the vocabulary (0..{vocab - 1})", "logit_bias"
            )
        if not -100 <= value <= 100:
            raise bad_request(
                f"logit_bias: bias {value} for token {token} is outside [-100, 100]", "logit_bias"
            )
        out[token] = float(value)
    return out


def _generation_defaults(state: ServerState) -> dict[str, Any]:
    gen = getattr(getattr(state.llm, "checkpoint", None), "generation", None) or {}
    out: dict[str, Any] = {}
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int)):
        value = gen.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = kind(value)
    return out


def _pick(value: Any, default: Any, fallback: Any) -> Any:
    return value if value is not None else (default if default is not None else fallback)


def _copy(p: SamplingParams) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(
        p, stop=list(p.stop), logit_bias=dict(p.logit_bias), processors=list(p.processors)
    )
