"""Running a planned request on the engine thread and answering it, whole or as Server-Sent Events.

Each generation request becomes a `scheduler.Request` whose events arrive on an asyncio queue. Streaming
answers are Server-Sent Events in the order clients rely on (research note §1.3): a role chunk per choice
(chat), content deltas (UTF-8-safe, stop strings never shown), a finish chunk per choice, the usage chunk
when `stream_options.include_usage`, then `data: [DONE]`. The response starts once the first token exists,
so an error found at admission is still a proper HTTP status. A client that goes away is noticed within a
fraction of a second, between tokens or while waiting, and its sequences are cancelled at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llamalab.serve import responses as fmt
from llamalab.serve.errors import CLIENT_CLOSED, APIError, error_body
from llamalab.serve.plan import Plan
from llamalab.serve.scheduler import ChoiceEvent, QueueFull
from llamalab.serve.scheduler import Request as Job
from llamalab.serve.state import ServerState

POLL_S = 0.2  # how often a waiting handler checks whether its client is still there
PING_S = 15.0  # SSE comment sent when a stream has been silent this long (long prefills)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    pass


class _Events:
    """The events of one job, read on the event loop, with a watch on the client's connection."""

    def __init__(self, state: ServerState, request: Request, plan: Plan) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self.request, self.state = request, state

        def sink(event: ChoiceEvent) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed (shutting down)
                pass

        self.job = Job(plan.prompts, plan.params, sink)
        self.open = len(plan.prompts)
        self.checked = loop.time()

    def submit(self) -> None:
        try:
            self.state.scheduler.submit(self.job)
        except QueueFull as e:
            raise APIError(
                503, f"{e}; retry later", code="server_busy", headers={"Retry-After": "1"}
            ) from None

    async def next(self, timeout: float | None = None) -> ChoiceEvent | None:
        """The next event; None after `timeout` seconds without one. Raises ClientGone (after cancelling
        the job) when the client has disconnected: checked every POLL_S, whether or not events flow."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            if loop.time() - self.checked >= POLL_S:
                self.checked = loop.time()
                if await self.request.is_disconnected():
                    self.cancel()
                    raise ClientGone
            try:
                event = await asyncio.wait_for(self.queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if timeout is not None and loop.time() - start >= timeout:
                    return None
                continue
            if event.finished:
                self.open -= 1
            return event

    def cancel(self) -> None:
        if self.open > 0:
            self.state.scheduler.cancel(self.job)


async def run_plan(state: ServerState, request: Request, plan: Plan) -> Response:
    """Submit `plan` and answer with its result (JSON) or its stream (SSE)."""
    events = _Events(state, request, plan)
    events.submit()
    rid, created = fmt.new_id(plan.kind), fmt.now()
    try:
        first = await events.next()
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        events.cancel()
        raise
    if first.error is not None:
        events.cancel()
        status, message = first.error
        raise APIError(status, message)
    if plan.stream:
        return StreamingResponse(
            _stream(state, plan, events, first, rid, created),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        return JSONResponse(await _collect(state, plan, events, first, rid, created))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        events.cancel()
        raise


class _Choices:
    """Per-choice accumulation of text, token counts, log-probabilities and finish reasons."""

    def __init__(self, n: int) -> None:
        self.pieces: list[list[str]] = [[] for _ in range(n)]  # joined once at the end: O(1) per event
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.offset = [0] * n  # completion text_offset so far (streaming)

    def add(self, event: ChoiceEvent) -> None:
        i = event.index
        if event.text:
            self.pieces[i].append(event.text)
        self.tokens[i] = max(self.tokens[i], event.n_generated)
        if event.logprob is not None:
            self.logprobs[i].append(event.logprob)
        if event.finished:
            self.finish[i] = event.finish_reason


async def _collect(
    state: ServerState, plan: Plan, events: _Events, first: ChoiceEvent, rid: str, created: int
):
    acc = _Choices(len(plan.prompts))
    event = first
    while True:
        if event.error is not None:
            events.cancel()
            raise APIError(*event.error)
        acc.add(event)
        if events.open == 0:
            break
        event = await events.next()
    use = fmt.usage(plan.prompt_tokens, sum(acc.tokens))
    tt, name = state.token_text, state.config.name
    if plan.kind == "chat":
        choices = [
            fmt.chat_choice(
                i,
                "".join(acc.pieces[i]),
                acc.finish[i],
                [fmt.chat_logprob(tt, lp) for lp in acc.logprobs[i]] if plan.logprobs else None,
            )
            for i in range(len(acc.pieces))
        ]
        return fmt.chat_response(rid, created, name, choices, use)
    choices = [
        fmt.completion_choice(
            i,
            "".join(acc.pieces[i]),
            acc.finish[i],
            fmt.completion_logprobs(tt, acc.logprobs[i]) if plan.logprobs else None,
        )
        for i in range(len(acc.pieces))
    ]
    return fmt.completion_response(rid, created, name, choices, use)


async def _stream(
    state: ServerState, plan: Plan, events: _Events, first: ChoiceEvent, rid: str, created: int
) -> AsyncIterator[bytes]:
    n, kind, name, tt = len(plan.prompts), plan.kind, state.config.name, state.token_text
    extra = {"usage": None} if plan.include_usage else {}
    acc = _Choices(n)

    def chunk(choices: list[dict]) -> bytes:
        return fmt.sse(fmt.chunk(kind, rid, created, name, choices, **extra))

    def delta(event: ChoiceEvent) -> dict:
        i = event.index
        lp = None
        if plan.logprobs:
            new = [event.logprob] if event.logprob is not None else []
            if kind == "chat":
                lp = {"content": [fmt.chat_logprob(tt, x) for x in new], "refusal": None}
            else:
                lp = fmt.completion_logprobs(tt, new, acc.offset[i])
        if kind == "chat":
            return {"index": i, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
        return {"index": i, "text": event.text, "logprobs": lp, "finish_reason": None}

    def finish(event: ChoiceEvent) -> dict:
        if kind == "chat":
            return {"index": event.index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
        return {"index": event.index, "text": "", "logprobs": None, "finish_reason": event.finish_reason}

    try:
        if kind == "chat":
            for i in range(n):
                role = {"role": "assistant", "content": ""}
                yield chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
        event: ChoiceEvent | None = first
        while True:
            if event is None:
                yield b": keep-alive\n\n"
            elif event.error is not None:
                events.cancel()
                yield fmt.sse(_error_of(event))
                break
            else:
                if event.text or (plan.logprobs and event.logprob is not None):
                    yield chunk([delta(event)])
                acc.offset[event.index] += len(event.text)
                acc.add(event)
                if event.finished:
                    yield chunk([finish(event)])
                if events.open == 0:
                    if plan.include_usage:
                        use = fmt.usage(plan.prompt_tokens, sum(acc.tokens))
                        yield fmt.sse(fmt.chunk(kind, rid, created, name, [], usage=use))
                    break
            event = await events.next(timeout=PING_S)
        yield fmt.sse("[DONE]")
    except ClientGone:
        return
    finally:
        events.cancel()  # no-op when every choice finished; frees the rows of a client that left


def _error_of(event: ChoiceEvent) -> dict:
    status, message = event.error
    return error_body(status, message)
