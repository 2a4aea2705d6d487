"""Run the server: bind the socket first (so the printed address is the real one, even for port 0), then
load the model in the background while `/health` says 503, then serve until interrupted.

`serve()` is what `llamalab serve` runs in the foreground; `BackgroundServer` runs the same app on a thread
of the calling process (for notebooks, tests and benchmarks that already hold a loaded model).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from llamalab.errors import LlamalabError
from llamalab.serve.app import create_app
from llamalab.serve.connections import guarded_protocol
from llamalab.serve.state import ServeConfig, ServerState


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6), or a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise LlamalabError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LlamalabError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def curl_example(url: str, config: ServeConfig) -> str:
    auth = ' -H "Authorization: Bearer $LLAMALAB_API_KEY"' if config.api_key else ""
    body = f'{{"model": "{config.name}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 64}}'
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which turns a deliberate stop into
        # a KeyboardInterrupt or a kill; a server stopped on purpose should just exit 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _uvicorn(app: Any, state: ServerState) -> uvicorn.Server:
    config = state.config
    protocol = guarded_protocol(config.max_connections, config.header_timeout, state.metrics)
    return _Server(
        uvicorn.Config(
            app,
            http=protocol,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )


def serve(config: ServeConfig, llm: Any = None, out=sys.stdout) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM). Raises LlamalabError if the model cannot be loaded."""
    config.validate()
    if llm is None:
        from llamalab.io.load import resolve

        resolve(config.model)  # a wrong name or path fails here, before anything listens
    sock = bind(config.host, config.port)
    url = url_of(sock)
    state = ServerState(config)
    server = _uvicorn(create_app(config, llm, state), state)

    def failed(message: str) -> None:
        server.should_exit = True

    def ready() -> None:
        state.ready.wait()
        if server.should_exit:
            return
        engine = state.scheduler.engine
        print(
            f"ready: {config.name} ({str(state.llm.dtype).replace('torch.', '')}, context {state.ctx}, batch {engine.max_batch}, "
            f"queue {config.max_queue}, KV cache {engine.cache.nbytes() / 2**20:.0f} MiB)",
            file=out,
            flush=True,
        )

    state.on_load_error = failed
    print(
        f"llamalab serve: listening on {url}  (model {config.model}; /health is 503 until it is loaded)",
        file=out,
    )
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        warn = "" if config.api_key else "; consider --api-key"
        print(f"warning: {config.host} is reachable from other machines{warn}", file=out)
    print(f"try:  {curl_example(url, config)}", file=out, flush=True)
    threading.Thread(target=ready, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.load_error:
        raise LlamalabError(state.load_error)
    print("stopped", file=out, flush=True)


class BackgroundServer:
    """`with BackgroundServer(config, llm) as url:` serves `llm` (or loads `config`'s model) on a thread until the
    block ends; the block starts once the model is loaded and warmed up, so its first request is answered
    (with `wait_for_model=False`, as soon as the server listens: to see it answer while loading)."""

    def __init__(self, config: ServeConfig, llm: Any = None, wait_for_model: bool = True) -> None:
        self.wait_for_model = wait_for_model
        self.config = config.validate()
        self.state = ServerState(config)
        self.server = _uvicorn(create_app(config, llm, self.state), self.state)
        self.sock = bind(config.host, config.port)
        self.url = url_of(self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 600
        while not (self.server.started and (self.state.ready.is_set() or not self.wait_for_model)):
            if self.state.load_error and self.wait_for_model:
                self.__exit__()
                raise LlamalabError(f"the background server's model failed to load: {self.state.load_error}")
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LlamalabError("the background server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
