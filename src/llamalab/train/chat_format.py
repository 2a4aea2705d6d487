"""Conversations and preference pairs as training tokens, rendered with the model's own chat template.

SFT trains on the assistant's tokens only: each assistant turn's span is where the rendering of the
conversation up to it (with the generation prompt) ends and where its rendering with the turn ends, so the
span holds the answer and the template's end-of-turn marker (the model learns to stop), and no system or
user token. Tokens are mapped to spans by the tokenizer's character offsets over the one rendered text, so
the tokens are exactly those of encoding the whole conversation.
"""

from __future__ import annotations

import hashlib
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.io.chat import normalize_messages, render_chat


class ChatFormat:
    """Renders messages with `tokenizer`'s chat template and marks the assistant tokens."""

    def __init__(self, tokenizer) -> None:
        if not tokenizer.chat_template:
            raise LlamalabError("chat and preference data need a model with a chat template")
        self.tokenizer = tokenizer
        self.fingerprint = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        tok = self.tokenizer
        return render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=generation_prompt,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
        )

    def encode_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """Tokens of `text` and whether each starts inside one of the character `spans`."""
        enc = self.tokenizer.backend.encode(text, add_special_tokens=False)
        mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return list(enc.ids), mask

    def conversation(self, messages: Any, where: str) -> tuple[list[int], list[bool]]:
        """A whole conversation's tokens, trainable on the assistant turns."""
        if not isinstance(messages, list) or not messages:
            raise LlamalabError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        try:
            messages = normalize_messages(messages)
        except LlamalabError as e:
            raise LlamalabError(f"{where}: {e}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise LlamalabError(f"{where}: no assistant message to train on")
        full = self.render(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True)
            through = self.render(messages[: i + 1], generation_prompt=False)
            if not (full.startswith(before) and full.startswith(through)):
                raise LlamalabError(
                    f"{where}: the chat template does not render this conversation turn by turn"
                )
            spans.append((len(before), len(through)))
        return self.encode_spans(full, spans)

    def pair(self, row: dict[str, Any], where: str) -> list[tuple[list[int], list[bool]]]:
        """The chosen and the rejected sequence of a preference pair, each trainable on its response only.
        A string prompt is used raw and a string response follows it, each tokenized on its own (as TRL does,
        so no token straddles the two); a prompt given as messages is rendered with the generation prompt,
        and a response then closes the assistant turn."""
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise LlamalabError(f"{where}: a preference pair needs 'prompt', 'chosen' and 'rejected'")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prefix, chat = prompt, False
        elif isinstance(prompt, list) and prompt:
            prefix, chat = self.render(normalize_messages(prompt), generation_prompt=True), True
        else:
            raise LlamalabError(f"{where}: 'prompt' must be a string or a list of messages")
        out = []
        for key in ("chosen", "rejected"):
            response = row[key]
            if isinstance(response, list) and response:  # [{"role": "assistant", "content": ...}]
                response = normalize_messages(response)[-1]["content"]
            if not isinstance(response, str) or not response:
                raise LlamalabError(f"{where}: {key!r} must be a non-empty string or assistant message")
            if not chat:
                p_ids = self.tokenizer.encode(prefix, add_special_tokens=False)
                r_ids = self.tokenizer.encode(response, add_special_tokens=False)
                out.append((p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)))
                continue
            full = self.render(
                [*normalize_messages(prompt), {"role": "assistant", "content": response}], False
            )
            if not full.startswith(prefix):
                raise LlamalabError(f"{where}: the chat template does not render this pair turn by turn")
            out.append(self.encode_spans(full, [(len(prefix), len(full))]))
        return out
