"""The interactive loop behind `llamalab chat`: streaming answers, history, /reset and /exit."""

from __future__ import annotations

import sys
from typing import Any

from llamalab.errors import LlamalabError

HELP = "Type a message. /reset clears the conversation, /exit (or Ctrl-D) quits."


def run_repl(llm, system: str | None, sampling: dict[str, Any], read=input, write=sys.stdout.write) -> None:
    """Chat with `llm` until /exit or end of input."""
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    write(f"{llm.name} ({llm.config.num_hidden_layers} layers). {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(base)
            write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text!r}. {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        answer = []
        try:
            for piece in llm.chat(history, stream=True, **sampling):
                answer.append(piece)
                write(piece)
                sys.stdout.flush()
        except LlamalabError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            history.pop()
            write(f"\nerror: {e} (use /reset to start over)\n")
            continue
        write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
