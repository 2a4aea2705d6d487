"""Helpers shared by the server tests (not fixtures): the openai client and `llamalab serve` as a subprocess."""

from __future__ import annotations

import os
import re
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
