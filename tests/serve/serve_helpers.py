"""Helpers shared by the server tests (not fixtures): the openai client and `llamalab serve` as a subprocess."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import time

import httpx

TINY_NAME = "tiny-llama"


def openai_client(url: str, api_key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120, **kw)


class CLIServer:
    """`llamalab serve` as a real subprocess; `url` is read from what it prints."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "llamalab.cli", "serve", "--port", "0", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
            if line.startswith("try:"):
                break
        if not self.url:
            self.stop()
            raise RuntimeError("llamalab serve did not start:\n" + "".join(self.lines))

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("llamalab serve exited:\n" + "".join(self.lines) + self.proc.stdout.read())
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rest = self.proc.stdout.read() if self.proc.stdout else ""
        return "".join(self.lines) + (rest or "")


class RawConnection:
    """A TCP connection to the server that speaks HTTP by hand, to send what no HTTP client would."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""
        self.eof = False

    def send(self, data: bytes) -> bool:
        """False once the server has closed the connection (or answered: nothing more is read then)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def trickle(self, data: bytes, interval: float) -> int:
        """Send `data` a byte at a time until the server answers or hangs up; the number of bytes sent."""
        for i in range(len(data)):
            if self._readable(interval) or not self.send(data[i : i + 1]):
                return i
        return len(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names) and body (by Content-Length)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._read(self.timeout), f"no complete response (got {self.buffer!r})"
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            assert self._read(self.timeout), "the connection closed in the middle of a response body"
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def closed_by_server(self) -> bool:
        return self.wait_closed()

    def wait_closed(self) -> bool:
        """True when the server closes the connection within this connection's timeout."""
        deadline = time.monotonic() + self.timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.eof

    def close(self) -> None:
        self.sock.close()

    def _readable(self, wait: float) -> bool:
        return bool(select.select([self.sock], [], [], wait)[0])

    def _read(self, wait: float) -> bool:
        """Read what arrives within `wait` seconds; False when nothing did or the stream ended."""
        if self.eof or not self._readable(max(wait, 0)):
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True
