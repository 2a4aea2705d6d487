"""Request bodies of the OpenAI API, validated strictly.

Types are strict (a string is not an integer, `true` is not 1, NaN is not a number) and every field must be
known: a field we do not implement is answered with a 400 that names it instead of being silently ignored,
so a client never believes it got, say, tool calls or audio. A few OpenAI fields that change nothing about
the generated text (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`) are accepted and
ignored. Extensions that vLLM and llama.cpp also accept: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, and `response_format` on /v1/completions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamalab.serve.errors import APIError, bad_request

# Known OpenAI fields that llamalab does not implement, with the value that means "not used" (accepted).
UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}
UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
}
# Message keys that assistant messages echoed back by clients carry; accepted only when empty.
_NULL_MESSAGE_KEYS = ("refusal", "tool_calls", "function_call", "audio", "annotations")
_MESSAGE_KEYS = {"role", "content", "name", *_NULL_MESSAGE_KEYS}
ROLES = {"system", "user", "assistant", "developer"}
_TYPE_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; we send no obfuscation padding
    continuous_usage_stats: bool | None = None  # vLLM's; accepted, not implemented (usage comes at the end)


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # outside, logits overflow
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    ignore_eos: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class JSONSchemaSpec(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise bad_request(f"the request body is not valid JSON ({e.msg} at {where})") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(body):
        _refuse_lone_surrogates(data)
    return data


# JSON may escape half of a UTF-16 surrogate pair on its own ("\ud800"), which decodes to a string that is
# not text: the tokenizer refuses it and it cannot be written back as UTF-8. Only an escape can produce
# one (raw surrogate bytes are invalid UTF-8), so the decoded body is searched only when the raw body has one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _refuse_lone_surrogates(data: dict[str, Any]) -> None:
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, v in reversed(list(value.items())):
                _check_text(key, path, "a field name in ")
                stack.append((v, f"{path}.{key}" if path else key))


def _check_text(text: str, path: str, what: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = f"\\u{ord(text[e.start]):04x}"
        where = f"{what}{path or 'the request body'}"
        raise bad_request(
            f"{where} contains a lone UTF-16 surrogate ({code} without its pair), which is not text; "
            "send the character itself or a complete surrogate pair",
            path or None,
        ) from None


def _reject_constant(name: str) -> None:
    raise APIError(400, f"the request body contains {name}, which is not valid JSON")


def validate(model: type[_Strict], data: dict[str, Any], unsupported: dict[str, tuple] | None = None) -> Any:
    """`model` validated from `data`; unsupported and unknown fields are named in one 400."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    unsupported = unsupported or {}
    used = sorted(k for k, ok in unsupported.items() if k in data and not _harmless(data[k], ok))
    if used:
        raise bad_request(
            f"unsupported field(s): {', '.join(used)} (llamalab serves text generation only)", used[0]
        )
    unknown = sorted(k for k in data if k not in known and k not in unsupported)
    if unknown:
        raise bad_request(f"unrecognized request field(s): {', '.join(unknown)}", unknown[0])
    clean = {k: v for k, v in data.items() if k not in unsupported}
    try:
        return model.model_validate(clean)
    except ValidationError as e:
        raise validation_error(e) from None


def _harmless(value: Any, ok: tuple) -> bool:
    return any(value == v and type(value) is type(v) for v in ok)


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"]]
    field = loc[0] if loc else None
    if field in _TYPE_HINTS:
        return bad_request(f"{field} must be {_TYPE_HINTS[field]}", field)
    path = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".")
    msg = err["msg"]
    if err["type"] == "missing":
        return bad_request(f"missing required field {path}", path)
    if err["type"] == "too_short":
        return bad_request(f"{path} must not be empty", path)
    if err["type"] == "extra_forbidden":
        return bad_request(f"unrecognized field {path}", path)
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {json.dumps(got)[:40]})"
    return bad_request(f"{path}: {msg[0].lower() + msg[1:]}{shown}", path)


def check_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages ready for the chat template: known roles and keys only ('developer' is a system message)."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            shown = json.dumps(role)[:40]
            hint = " (tool messages are not supported)" if role in ("tool", "function") else ""
            raise bad_request(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}, not {shown}{hint}", f"{where}.role"
            )
        extra = sorted(set(m) - _MESSAGE_KEYS)
        if extra:
            raise bad_request(f"{where}: unsupported field(s) {', '.join(extra)}", f"{where}.{extra[0]}")
        if m.get("content") is None:
            raise bad_request(
                f"{where}.content is missing; every message needs its text (tool calls are not supported)",
                f"{where}.content",
            )
        for key in _NULL_MESSAGE_KEYS:
            if m.get(key) not in (None, [], ""):
                raise bad_request(f"{where}.{key} is not supported", f"{where}.{key}")
        if "name" in m and not isinstance(m["name"], str):
            raise bad_request(f"{where}.name must be a string", f"{where}.name")
        clean = {"role": "system" if role == "developer" else role, "content": m.get("content")}
        if "name" in m:
            clean["name"] = m["name"]
        out.append(clean)
    return out


def parse_response_format(value: dict[str, Any] | None) -> tuple[str, dict[str, Any] | bool | None]:
    """("text" | "json_object" | "json_schema", the schema or None)."""
    if value is None:
        return "text", None
    kind = value.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise bad_request(
            f"response_format.type must be text, json_object or json_schema, not {json.dumps(kind)[:40]}",
            "response_format.type",
        )
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise bad_request(f"response_format: unrecognized field(s) {', '.join(extra)}", "response_format")
    if kind != "json_schema":
        if "json_schema" in value:
            raise bad_request(
                "response_format.json_schema is only allowed with type json_schema", "response_format"
            )
        return kind, None
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            "response_format.json_schema must be an object with a 'schema'", "response_format.json_schema"
        )
    try:
        return "json_schema", JSONSchemaSpec.model_validate(spec).schema_
    except ValidationError as e:
        err = validation_error(e)
        raise bad_request(
            f"response_format.json_schema.{err.message}", "response_format.json_schema"
        ) from None
