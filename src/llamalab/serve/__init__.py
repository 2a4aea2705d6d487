"""OpenAI-compatible HTTP serving with continuous batching and structured (JSON schema) output.

`llamalab serve` runs it; `create_app` builds the ASGI app, `BackgroundServer` runs it on a thread.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app", "BackgroundServer"]

_WHERE = {
    "ServeConfig": "llamalab.serve.state",
    "create_app": "llamalab.serve.app",
    "BackgroundServer": "llamalab.serve.server",
}


def __getattr__(name: str):
    # Imported lazily: every `llamalab` command imports serve.cli, and should not pay for FastAPI/uvicorn.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
