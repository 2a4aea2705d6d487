"""`llamalab serve` as a user runs it: a real subprocess, its printed address and curl example, its key."""

from __future__ import annotations

import signal

import httpx
import openai
import pytest

from .serve_helpers import CLIServer, openai_client


def test_serve_command_end_to_end(tiny_model_dir):
    server = CLIServer(
        "--model", str(tiny_model_dir), "--context", "128", "--api-key", "k-42", "--served-model-name", "tiny"
    )
    try:
        head = "".join(server.lines)
        assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        assert f"curl {server.url}/v1/chat/completions" in head and "Authorization: Bearer" in head
        assert "k-42" not in head  # the key itself is never printed
        server.wait_ready()
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        client = openai_client(server.url, api_key="k-42")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai_client(server.url, api_key="nope").models.list()
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        out = server.stop()
    assert server.proc.returncode == 0, out  # a deliberate stop is a clean exit
    assert "ready: tiny" in out and out.rstrip().endswith("stopped") and "Traceback" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-connections", "0"], "--max-connections"),
        (["--header-timeout", "0"], "--header-timeout"),
        (["--body-timeout", "-1"], "--body-timeout"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_bad_options_fail_in_one_line(args, message, capsys):
    from llamalab.cli import main

    assert main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
