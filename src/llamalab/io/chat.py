"""Chat templates: the model's own Jinja template, rendered in jinja2's immutable sandbox.

A template comes from `tokenizer_config.json` / `chat_template.jinja` or the GGUF key
`tokenizer.chat_template`. We render it the way transformers' `apply_chat_template` does (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not HTML-escape, `strftime_now`), so
the prompt text is identical; the sandbox keeps a template from reaching Python internals.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamalab.errors import LlamalabError

Message = dict[str, Any]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlamalabError(f"chat template does not parse: {e}") from None


def normalize_messages(messages: list[Message]) -> list[Message]:
    """Check roles/content and flatten OpenAI list-of-parts content into text."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise LlamalabError(f"message {i} must be an object with 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise LlamalabError(f"message {i}: only text content parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise LlamalabError(f"message {i}: content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def render_chat(
    template: str | None,
    messages: list[Message],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """The prompt text for `messages` under `template`."""
    if not template:
        raise LlamalabError("this model has no chat template; use a raw prompt (drop --chat) instead")
    try:
        return _compile(template).render(
            messages=normalize_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise LlamalabError(f"chat template failed: {e}") from None
