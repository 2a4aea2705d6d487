"""`llamalab serve`: the OpenAI-compatible server as a sub-command (registered by `llamalab.cli`)."""

from __future__ import annotations

from typing import Annotated

import typer

from llamalab.cli import DtypeOpt, ModelOpt, ThreadsOpt
from llamalab.io.registry import DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: ModelOpt = DEFAULT_MODEL,
        host: Annotated[
            str, typer.Option(help="Address to listen on. The default serves this machine only.")
        ] = "127.0.0.1",
        port: Annotated[
            int, typer.Option(help="TCP port (0: any free port; the real one is printed).")
        ] = 8000,
        api_key: Annotated[
            str | None,
            typer.Option(
                envvar="LLAMALAB_API_KEY",
                help="Require 'Authorization: Bearer KEY' on every route but /health (env LLAMALAB_API_KEY).",
            ),
        ] = None,
        max_batch: Annotated[int, typer.Option(help="Sequences decoded together (batch slots).")] = 8,
        max_queue: Annotated[
            int, typer.Option(help="Sequences that may wait for a slot; beyond that requests get 503.")
        ] = 64,
        ctx: Annotated[
            int | None,
            typer.Option(help="Context per sequence: prompt + answer tokens (default: the model's context)."),
        ] = None,
        served_model_name: Annotated[
            str | None, typer.Option(help="Model id clients send and /v1/models lists (default: --model).")
        ] = None,
        max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 4 * 1024 * 1024,
        dtype: DtypeOpt = "fp32",
        threads: ThreadsOpt = None,
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, JSON schema
        output) with continuous batching. Point the `openai` client at http://HOST:PORT/v1."""
        from llamalab.serve.server import serve as run
        from llamalab.serve.state import ServeConfig

        run(
            ServeConfig(
                model=model,
                dtype=dtype,
                threads=threads,
                host=host,
                port=port,
                api_key=api_key,
                max_batch=max_batch,
                max_queue=max_queue,
                ctx=ctx,
                served_model_name=served_model_name,
                max_body_bytes=max_body_bytes,
            )
        )
