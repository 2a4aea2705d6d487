"""`llamalab serve`: the OpenAI-compatible server as a sub-command (registered by `llamalab.cli`)."""

from __future__ import annotations

from typing import Annotated

import typer

from llamalab.model.build import AUTO
from llamalab.model_options import ModelOptions, model_options


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options(dtype=AUTO)
    def serve(
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
        prefill_chunk: Annotated[
            int,
            typer.Option(
                help="Prompt tokens prefilled per step: a long prompt delays running streams by one chunk."
            ),
        ] = 512,
        served_model_name: Annotated[
            str | None, typer.Option(help="Model id clients send and /v1/models lists (default: --model).")
        ] = None,
        max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 4 * 1024 * 1024,
        max_connections: Annotated[
            int, typer.Option(help="Open connections allowed; a new one beyond them gets 503 and is closed.")
        ] = 256,
        header_timeout: Annotated[
            float, typer.Option(help="Seconds a request's headers may take to arrive (then 408, closed).")
        ] = 10.0,
        body_timeout: Annotated[
            float, typer.Option(help="Seconds a request's body may take to arrive after its headers (408).")
        ] = 30.0,
        *,
        opts: ModelOptions,
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, JSON schema
        output) with continuous batching. Point the `openai` client at http://HOST:PORT/v1. Each sequence
        holds up to --context tokens (prompt + answer) in the --kv cache."""
        from llamalab.serve.server import serve as run
        from llamalab.serve.state import ServeConfig

        run(
            ServeConfig(
                opts=opts,
                host=host,
                port=port,
                api_key=api_key,
                max_batch=max_batch,
                max_queue=max_queue,
                prefill_chunk=prefill_chunk,
                served_model_name=served_model_name,
                max_body_bytes=max_body_bytes,
                max_connections=max_connections,
                header_timeout=header_timeout,
                body_timeout=body_timeout,
            )
        )
