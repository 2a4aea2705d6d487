"""The connection level, below the app: what uvicorn's HTTP/1.1 protocol does not guard by itself.

uvicorn (h11) waits forever for a request's headers, so a client that trickles them a byte at a time (or
opens connections and sends nothing) holds a socket and its memory indefinitely; it accepts any number of
connections; and it answers broken framing (`Content-Length: abc`, two different lengths) with a plain-text
400. `guarded_protocol` adds, per connection:

- a deadline for each request's headers (`--header-timeout`), from the moment the server waits for it (the
  connection opened, or the previous response ended): then 408 in OpenAI's error shape and the connection
  is closed (a connection that sent nothing is closed quietly, as keep-alive does);
- a cap on open connections (`--max-connections`): beyond it, 503 with `Retry-After` and close, at once;
- OpenAI's error shape, naming what h11 found wrong, for requests it cannot parse;
- no waiting for a body nobody reads: once a response is sent while the client is still sending its
  request body (an error answered before reading it), the connection is closed.

The request body's own deadline (`--body-timeout`) is enforced by the app's gate, which reads it, so that
the 408 is an ordinary response, counted in `/metrics`. Responses written here bypass the app, so they are
counted in `llamalab_connections_refused_total` instead.
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from llamalab.serve.errors import error_body
from llamalab.serve.metrics import Metrics


class _Connection(h11.Connection):
    """h11's connection, remembering why it refused a request (uvicorn logs and answers it generically)."""

    protocol_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.protocol_error = e
            raise


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with header deadlines, a connection cap and JSON framing errors."""

    max_connections = 256
    header_timeout = 10.0
    metrics: Metrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER)  # h11's default header size limit, as uvicorn's
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            message = (
                f"the server has {self.max_connections} connections open, its limit (--max-connections); "
                "retry later"
            )
            self._answer_and_close(503, message, "too_many_connections", {"Retry-After": "1"})
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request's headers are complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # the rest of a request body nobody will read: do not wait for it
        else:
            self._arm_header_timer()  # before a pipelined request is handled, which cancels it
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        error = self.conn.protocol_error
        status = error.error_status_hint if error is not None else 400
        detail = str(error) if error is not None else msg
        self._answer_and_close(status, f"malformed HTTP request: {detail}", "malformed_request")

    # --- the header deadline ---------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        serving = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or serving:
            return
        if self.conn.trailing_data[0]:  # part of a request arrived, not all of its headers
            message = (
                f"the request headers did not arrive within {self.header_timeout:g} s (--header-timeout)"
            )
            self._answer_and_close(408, message, "header_timeout")
        else:
            self.transport.close()

    # --- answering outside the app -------------------------------------------------------------------------

    def _answer_and_close(
        self, status: int, message: str, reason: str, headers: dict[str, str] | None = None
    ) -> None:
        """Write an error response in OpenAI's shape straight to the socket (no request may exist to answer
        through h11), then close the connection."""
        body = json.dumps(error_body(status, message)).encode()
        lines = [
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close",
            *(f"{k.lower()}: {v}" for k, v in (headers or {}).items()),
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.transport.close()
        if self.metrics is not None:
            self.metrics.connection_refused(reason)


def guarded_protocol(max_connections: int, header_timeout: float, metrics: Metrics) -> type[GuardedProtocol]:
    """The protocol class for uvicorn's `http=`, with these limits (uvicorn builds one per connection)."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"max_connections": max_connections, "header_timeout": header_timeout, "metrics": metrics},
    )
