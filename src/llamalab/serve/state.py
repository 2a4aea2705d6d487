"""What a running server holds: its settings, the loaded model, the engine thread, and readiness.

The model loads on a background thread after the socket is bound, so `/health` can answer 503 while it
loads (as llama.cpp does) and a supervisor sees the port open at once. Before serving, one short generation
warms up the kernels, so the first client does not pay for their first-call set-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.generate.sampling import SamplingParams
from llamalab.model_options import ModelOptions
from llamalab.serve.constrained import GrammarCompiler
from llamalab.serve.errors import APIError
from llamalab.serve.metrics import Metrics
from llamalab.serve.responses import TokenText
from llamalab.serve.scheduler import Scheduler

log = logging.getLogger("llamalab.serve")


@dataclass
class ServeConfig:
    """Server settings (the `llamalab serve` options); the model, its context (prompt + answer tokens per
    sequence) and KV cache come from the shared model options."""

    opts: ModelOptions = field(default_factory=ModelOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    served_model_name: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_connections: int = 256  # open connections; beyond that a new one gets 503 and is closed
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    body_timeout: float = 30.0  # seconds for a request's body to arrive once its headers have
    prefill_chunk: int = 512  # prompt tokens prefilled per engine step

    @property
    def model(self) -> str:
        return self.opts.model

    def validate(self) -> ServeConfig:
        checks = [
            (self.max_batch >= 1, f"--max-batch must be >= 1, not {self.max_batch}"),
            (self.max_queue >= 0, f"--max-queue must be >= 0, not {self.max_queue}"),
            (self.prefill_chunk >= 1, f"--prefill-chunk must be >= 1, not {self.prefill_chunk}"),
            (0 <= self.port <= 65535, f"--port must be in 0..65535, not {self.port}"),
            (self.max_body_bytes >= 1024, "--max-body-bytes must be >= 1024"),
            (self.api_key is None or self.api_key.strip() != "", "--api-key must not be empty"),
            (self.max_connections >= 1, f"--max-connections must be >= 1, not {self.max_connections}"),
            (self.header_timeout > 0, f"--header-timeout must be > 0 seconds, not {self.header_timeout:g}"),
            (self.body_timeout > 0, f"--body-timeout must be > 0 seconds, not {self.body_timeout:g}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamalabError(message)
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class ServerState:
    """Shared by every request handler."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.llm: Any = None
        self.scheduler: Scheduler | None = None
        self.grammar: GrammarCompiler | None = None
        self.grammar_error: str | None = None
        self.token_text: TokenText | None = None
        self.ctx = 0
        self.created = int(time.time())
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.on_load_error: Callable[[str], None] | None = None

    # --- loading --------------------------------------------------------------------------------------

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="llamalab-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            from llamalab.model_options import load_model

            self.attach(load_model(self.config.opts))
        except LlamalabError as e:
            self._failed(str(e))
        except Exception as e:  # e.g. out of memory: say so, do not hang in "loading"
            log.exception("loading failed")
            self._failed(f"loading {self.config.model} failed ({type(e).__name__}: {e})")

    def _failed(self, message: str) -> None:
        self.load_error = message
        if self.on_load_error:
            self.on_load_error(message)

    def attach(self, llm: Any) -> None:
        """Serve `llm` (a loaded `llamalab.LLM`, its context and KV cache set by the model options): build the
        engine, warm it up, start the engine thread."""
        opts, context = self.config.opts, llm.config.max_position_embeddings
        ctx = opts.context or context
        if ctx > context:
            raise LlamalabError(f"--context {ctx} is more than the model's context ({context})")
        engine = llm.engine(
            max_batch=self.config.max_batch,
            max_len=ctx,
            kv=opts.kv_spec,
            prefill_chunk=self.config.prefill_chunk,
        )
        self._warm_up(engine, llm)
        try:
            self.grammar = GrammarCompiler(llm.tokenizer, llm.config.vocab_size, llm.eos_token_ids)
        except LlamalabError as e:
            self.grammar_error = str(e)
            log.warning("%s", e)
        self.token_text = TokenText(llm.tokenizer)
        self.llm, self.ctx = llm, ctx
        self.scheduler = Scheduler(engine, self.config.max_queue, self.metrics)
        self.scheduler.start()
        self.ready.set()

    @staticmethod
    def _warm_up(engine: Any, llm: Any) -> None:
        ids = llm.encode("Hello") or [0]
        for _ in range(min(2, engine.max_batch)):
            engine.add(ids[: engine.max_len - 4], SamplingParams(max_new_tokens=3))
        while engine.active:
            engine.step()

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()

    # --- per request ----------------------------------------------------------------------------------

    def require_ready(self) -> None:
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "2"})

    @property
    def model_names(self) -> set[str]:
        return {self.config.name, self.config.model}

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.name!r}",
                "model",
                "model_not_found",
            )
