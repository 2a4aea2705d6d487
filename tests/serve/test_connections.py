"""The connection level, as a hostile client speaks it over a raw socket: slow headers and bodies are timed
out, the number of open connections is capped, broken HTTP framing is answered in OpenAI's error shape, and a
client that hangs up while sending its body is counted as a client disconnect, not as a server error."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import pytest

from llamalab.model_options import ModelOptions
from llamalab.serve.errors import error_body
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig

from .serve_helpers import TINY_NAME, RawConnection

CHAT = json.dumps({"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def assert_openai_error_bytes(body: bytes, status: int, headers: dict[str, str]) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == error_body(status, "")["error"]["type"]
    return err


def metric_count(url: str, endpoint: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf'^llamalab_requests_total{{endpoint="{endpoint}",status="{status}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def guarded_server(tiny_llm, tiny_model_dir):
    """Short timeouts, so the tests need not wait for the defaults."""
    config = ServeConfig(
        ModelOptions(str(tiny_model_dir), context=128),
        served_model_name=TINY_NAME,
        port=0,
        header_timeout=0.5,
        body_timeout=1.0,
    )
    with BackgroundServer(config, tiny_llm) as url:
        yield url


def test_headers_trickled_byte_by_byte_are_timed_out(guarded_server):
    conn = RawConnection(guarded_server)
    request = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(CHAT)}\r\n".encode()
    sent = conn.trickle(request, interval=0.05)  # no blank line: the headers never end
    assert sent < len(request), "the server kept reading a request whose headers never ended"
    status, headers, body = conn.response()
    assert status == 408
    assert "header" in assert_openai_error_bytes(body, 408, headers)["message"]
    assert conn.closed_by_server()


def test_a_silent_connection_is_closed(guarded_server):
    conn = RawConnection(guarded_server)
    assert conn.wait_closed(), "an idle connection that never sent a byte stayed open"


def test_a_body_trickled_byte_by_byte_is_timed_out(guarded_server):
    before = metric_count(guarded_server, "/v1/chat/completions", 408)
    conn = RawConnection(guarded_server)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(CHAT)}\r\n\r\n"
    )
    conn.send(head.encode())
    sent = conn.trickle(CHAT.encode()[:-1], interval=0.05)  # one byte short: the body never completes
    assert sent < len(CHAT) - 1, "the server kept reading a body that never completed"
    status, headers, body = conn.response()
    assert status == 408 and "body" in assert_openai_error_bytes(body, 408, headers)["message"]
    assert conn.closed_by_server()
    assert metric_count(guarded_server, "/v1/chat/completions", 408) == before + 1


def test_a_body_nobody_reads_does_not_keep_the_connection(guarded_server):
    """A route that answers without reading the body (404 here) must not wait forever for the rest of it."""
    conn = RawConnection(guarded_server)
    conn.send(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
    status, _, _ = conn.response()
    assert status == 404
    assert conn.trickle(b"x" * 100, interval=0.05) < 100
    assert conn.closed_by_server()


def test_a_prompt_request_still_works_with_short_timeouts(guarded_server):
    r = httpx.post(
        f"{guarded_server}/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200
    # A client that keeps its connection between requests is fine (keep-alive is not a request timeout).
    with httpx.Client(base_url=guarded_server) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.3)


def test_connections_beyond_the_cap_get_a_503(tiny_llm, tiny_model_dir):
    config = ServeConfig(
        ModelOptions(str(tiny_model_dir), context=128), served_model_name=TINY_NAME, port=0, max_connections=3
    )
    with BackgroundServer(config, tiny_llm) as url:
        held = [RawConnection(url) for _ in range(3)]
        for c in held:
            c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.response()[0] == 200  # the three are open (kept alive)
        extra = RawConnection(url)
        status, headers, body = extra.response()
        assert status == 503 and headers.get("retry-after") == "1"
        assert "connections" in assert_openai_error_bytes(body, 503, headers)["message"]
        assert extra.closed_by_server()
        held[0].close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed connection, and a new client gets in
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no room after a connection closed"
            time.sleep(0.05)
        text = httpx.get(f"{url}/metrics").text
        assert re.search(
            r'^llamalab_connections_refused_total{reason="too_many_connections"} [1-9]', text, re.M
        )


@pytest.mark.parametrize(
    "header, what",
    [
        (b"Content-Length: abc", "Content-Length"),
        (b"Content-Length: -1", "Content-Length"),
        (b"Content-Length: 99999999999999999999999999999999", "Content-Length"),
        (b"Content-Length: 5\r\nContent-Length: 6", "Content-Length"),
        (b"Transfer-Encoding: gzip", "Transfer-Encoding"),
    ],
)
def test_broken_framing_gets_the_openai_error_shape(tiny_server, header, what):
    conn = RawConnection(tiny_server)
    conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n{}")
    status, headers, body = conn.response()
    assert 400 <= status < 600
    err = assert_openai_error_bytes(body, status, headers)
    assert what in err["message"] and "malformed HTTP request" in err["message"]
    assert conn.closed_by_server()
    assert httpx.get(f"{tiny_server}/health").status_code == 200


def test_hanging_up_while_sending_the_body_is_a_client_disconnect(tiny_server, caplog):
    endpoint = "/v1/chat/completions"
    before = {s: metric_count(tiny_server, endpoint, s) for s in (499, 500)}
    uvicorn_errors = _Collect()
    logging.getLogger("uvicorn.error").addHandler(uvicorn_errors)
    try:
        conn = RawConnection(tiny_server)
        conn.send(
            f"POST {endpoint} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(CHAT)}\r\n\r\n{CHAT[:10]}".encode()
        )
        time.sleep(0.2)
        conn.close()
        deadline = time.monotonic() + 10
        while metric_count(tiny_server, endpoint, 499) == before[499]:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.05)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_errors)
    assert metric_count(tiny_server, endpoint, 500) == before[500]
    assert not uvicorn_errors.records and not [r for r in caplog.records if r.levelno >= logging.ERROR]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
