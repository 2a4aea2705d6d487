"""Response bodies and stream chunks in OpenAI's format (§1.3 of the engine research note).

Chat: `chat.completion` / `chat.completion.chunk` with `message` / `delta`; legacy completions:
`text_completion` with `text`. Log-probabilities follow each API's own shape: chat's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`, completions' parallel lists
`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`. A token that is only part of a UTF-8 character
is shown OpenAI's way, as `bytes:\\xNN...`, with its exact bytes in `bytes`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from llamalab.generate.engine import TokenLogprob
from llamalab.io.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class TokenText:
    """The exact bytes and display string of single tokens, for log-probabilities."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
        self.byte_level = '"ByteLevel"' in json.dumps(decoder)
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def bytes(self, token: int) -> bytes:
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if self.byte_level:
            try:
                return bytes(self.byte_of[c] for c in piece)
            except KeyError:  # an added token written in plain text
                return piece.encode()
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def show(self, token: int) -> tuple[str, list[int]]:
        """(display string, list of byte values)."""
        if token not in self.cache:
            raw = self.bytes(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.cache[token] = (text, list(raw))
        return self.cache[token]


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


# --- log-probabilities ------------------------------------------------------------------------------------


def chat_logprob(tt: TokenText, lp: TokenLogprob) -> dict[str, Any]:
    text, raw = tt.show(lp.token)
    top = []
    for token, value in lp.top:
        t, b = tt.show(token)
        top.append({"token": t, "logprob": value, "bytes": b})
    return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


def completion_logprobs(tt: TokenText, lps: list[TokenLogprob], start_offset: int = 0) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    offset = start_offset
    for lp in lps:
        text, _ = tt.show(lp.token)
        tokens.append(text)
        values.append(lp.logprob)
        top = {tt.show(t)[0]: v for t, v in lp.top}
        top.setdefault(text, lp.logprob)  # OpenAI: the sampled token is always among them
        tops.append(top)
        offsets.append(offset)
        offset += len(text) if not text.startswith("bytes:") else 0
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# --- whole responses and stream chunks --------------------------------------------------------------------


def chat_response(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
    }


def chat_choice(index: int, text: str, finish: str, logprobs: list[dict] | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        "finish_reason": finish,
    }


def completion_response(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
    }


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
        **extra,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
