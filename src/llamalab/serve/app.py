"""The OpenAI-compatible HTTP API (FastAPI/Starlette, served by uvicorn).

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /metrics` (Prometheus text), `POST /tokenize`, `POST /detokenize`.

A generation request is validated (`schemas`), turned into prompt ids and sampling settings per choice
(`plan`), and run through the engine thread (`run`, `scheduler`).

Guarding the door: bodies larger than `max_body_bytes` get 413, a body that is not JSON by its Content-Type
415, a body that does not arrive within `body_timeout` 408, a missing or wrong `Authorization: Bearer` (with
`--api-key`) 401, a full queue 503 with `Retry-After`, and every error, ours included, has OpenAI's error
shape; nothing a client sends can stop the server. A client that hangs up before its request is read is
counted as status 499 (nginx's "client closed request"), not as a server error. Below the app,
`connections` times out slow headers and caps open connections.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llamalab.errors import LlamalabError
from llamalab.serve.errors import CLIENT_CLOSED, APIError, bad_request, error_body
from llamalab.serve.plan import chat_plan, completion_plan
from llamalab.serve.run import run_plan
from llamalab.serve.schemas import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_messages,
    parse_json_body,
    validate,
)
from llamalab.serve.state import ServeConfig, ServerState

log = logging.getLogger("llamalab.serve")

OPEN_PATHS = {"/health"}  # answered without an API key (load balancers probe it)
ENDPOINTS = {
    "/health",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/metrics",
    "/tokenize",
    "/detokenize",
}


# --- the gate: metrics, auth, body size and deadline, content type -------------------------------------


class Gate:
    """Pure-ASGI middleware in front of every route: counts answers by endpoint and status, checks the
    bearer key and the content type, and refuses bodies over the limit (by Content-Length at once, or while
    streaming in) or slower than the body deadline."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refusal(scope, path)
            if error is not None:
                await error.response()(scope, receive, send_counted)
                return
            await self.app(scope, self._body_reader(receive), send_counted)
        finally:
            self.state.metrics.request_done(path if path in ENDPOINTS else "other", status[0])

    def _body_reader(self, receive: Any) -> Any:
        """`receive` with the body's size limit and deadline (the deadline ends once the body is in)."""
        config = self.state.config
        limit, timeout = config.max_body_bytes, config.body_timeout
        loop = asyncio.get_running_loop()
        deadline, seen, complete = loop.time() + timeout, [0], [False]

        async def limited_receive() -> dict:
            if complete[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                message = f"the request body did not arrive within {timeout:g} s (--body-timeout)"
                raise APIError(408, message, headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise APIError(413, f"the request body is larger than {limit} bytes")
                complete[0] = not message.get("more_body", False)
            return message

        return limited_receive

    def _refusal(self, scope: dict, path: str) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.state.config.api_key
        if key and path not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(
                    401,
                    "missing or wrong API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        content_type = headers.get("content-type")
        if scope.get("method") == "POST" and path in ENDPOINTS and content_type is not None:
            media = content_type.partition(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                return APIError(
                    415,
                    f"the request body must be JSON, sent with Content-Type: application/json, not {content_type[:80]}",
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, "the Content-Length header is not a number")
            if int(length) > self.state.config.max_body_bytes:
                return APIError(
                    413, f"the request body is larger than {self.state.config.max_body_bytes} bytes"
                )
        return None


# --- the app ---------------------------------------------------------------------------------------------


def create_app(config: ServeConfig, llm: Any = None, state: ServerState | None = None) -> FastAPI:
    """The ASGI app. With `llm` it serves that loaded model at once; otherwise it loads `config.model` on a
    background thread after start-up and answers 503 until then."""
    state = state or ServerState(config.validate())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if llm is not None:
            await asyncio.to_thread(state.attach, llm)
        elif not state.ready.is_set() and state.load_error is None:
            state.load_in_background()
        try:
            yield
        finally:
            await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="llamalab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llamalab = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
        text = message.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, text), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(f"invalid request: {exc.errors()[0].get('msg', 'bad value')}").response()

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("client disconnected while sending its request to %s", request.url.path)
        return Response(status_code=CLIENT_CLOSED)  # not sent (nobody is there); counted in /metrics

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__})"), 500)

    # --- informational routes -------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error:
            body = error_body(503, f"the model failed to load: {state.load_error}", code="model_load_failed")
            return JSONResponse({"status": "error", **body}, 503)
        if not state.ready.is_set():
            body = error_body(503, "the model is loading")
            return JSONResponse({"status": "loading", **body}, 503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok"})

    def model_card() -> dict[str, Any]:
        return {
            "id": config.name,
            "object": "model",
            "created": state.created,
            "owned_by": "llamalab",
            "root": config.model,
            "max_model_len": state.ctx or None,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        state.require_ready()
        req = validate(TokenizeRequest, parse_json_body(await request.body()))
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of prompt or messages", "prompt")
        if req.prompt is not None:
            ids = state.llm.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = _chat_ids(state, req.messages)
        return {"count": len(ids), "max_model_len": state.ctx, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        state.require_ready()
        req = validate(DetokenizeRequest, parse_json_body(await request.body()))
        state.check_model(req.model)
        vocab = state.llm.config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"tokens: id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": state.llm.decode(req.tokens, skip_special_tokens=False)}

    # --- generation ------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.require_ready()
        req = validate(ChatRequest, parse_json_body(await request.body()), UNSUPPORTED_CHAT)
        state.check_model(req.model)
        prompt_ids = await asyncio.to_thread(_chat_ids, state, req.messages)
        plan = await asyncio.to_thread(chat_plan, state, req, prompt_ids)
        return await run_plan(state, request, plan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        state.require_ready()
        req = validate(CompletionRequest, parse_json_body(await request.body()), UNSUPPORTED_COMPLETION)
        state.check_model(req.model)
        plan = await asyncio.to_thread(completion_plan, state, req)
        return await run_plan(state, request, plan)

    return app


def _chat_ids(state: ServerState, messages: list[dict[str, Any]]) -> list[int]:
    try:
        return state.llm.chat_ids(check_messages(messages))
    except LlamalabError as e:
        raise bad_request(str(e), "messages") from None
