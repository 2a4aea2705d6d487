"""JSON Lines as user input: one value per non-blank line, a malformed line named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from llamalab.errors import LlamalabError


def jsonl_values(data: bytes | str, source: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of `data` (the text of `source`)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LlamalabError(f"{source}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamalabError(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
