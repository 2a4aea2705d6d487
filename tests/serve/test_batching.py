"""Continuous batching under load: the bounded queue, disconnects, loading, and batch-independent results."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from llamalab.model_options import ModelOptions
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig

from .serve_helpers import TINY_NAME, openai_client

LONG = {"model": TINY_NAME, "prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_for(cond, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def busy_server(tiny_llm, tiny_model_dir):
    """Two batch slots and one queue place, with room for long answers."""
    config = ServeConfig(
        ModelOptions(str(tiny_model_dir)), served_model_name=TINY_NAME, port=0, max_batch=2, max_queue=1
    )
    with BackgroundServer(config, tiny_llm) as url:
        yield url


def open_stream(url: str, body: dict) -> tuple[httpx.Client, httpx.Response, object]:
    client = httpx.Client(timeout=60)
    cm = client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True})
    response = cm.__enter__()
    return client, response, cm


def test_disconnect_mid_stream_frees_the_slot_at_once(busy_server):
    before = metric(busy_server, "llamalab_generation_tokens_total")
    client, response, cm = open_stream(busy_server, LONG)
    lines = response.iter_lines()
    got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
    assert got and json.loads(got[0][6:])["object"] == "text_completion"
    assert metric(busy_server, "llamalab_running_sequences") == 1
    cm.__exit__(None, None, None)
    client.close()
    wait_for(lambda: metric(busy_server, "llamalab_running_sequences") == 0, timeout=10)
    generated = metric(busy_server, "llamalab_generation_tokens_total") - before
    assert generated < LONG["max_tokens"] / 2  # cancelled, not run to the end
    time.sleep(0.3)
    assert (
        metric(busy_server, "llamalab_generation_tokens_total") - before == generated
    )  # and it stays stopped


def test_disconnect_while_waiting_for_a_non_streaming_answer(busy_server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{busy_server}/v1/completions", json=LONG, timeout=0.5)
    wait_for(lambda: metric(busy_server, "llamalab_running_sequences") == 0, timeout=10)


def test_full_queue_answers_503_with_retry_after(busy_server):
    streams = [open_stream(busy_server, LONG) for _ in range(2)]  # both batch slots busy
    queued: dict = {}

    def third():  # waits in the queue: its response starts only when it gets a slot
        try:
            body = {**LONG, "max_tokens": 20}
            queued["status"] = httpx.post(f"{busy_server}/v1/completions", json=body, timeout=60).status_code
        except httpx.HTTPError as e:
            queued["error"] = e

    t = threading.Thread(target=third)
    t.start()
    wait_for(lambda: metric(busy_server, "llamalab_queue_depth") == 1)
    r = httpx.post(f"{busy_server}/v1/completions", json={**LONG, "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "server_busy" and r.json()["error"]["type"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError) as e:
        openai_client(busy_server).completions.create(model=TINY_NAME, prompt="x", max_tokens=2)
    assert e.value.status_code == 503
    for client, _, cm in streams:  # the two streaming clients leave: the queued one gets a slot
        cm.__exit__(None, None, None)
        client.close()
    t.join(60)
    assert queued == {"status": 200}
    wait_for(lambda: metric(busy_server, "llamalab_running_sequences") == 0)
    ok = httpx.post(f"{busy_server}/v1/completions", json={**LONG, "max_tokens": 2})
    assert ok.status_code == 200


def test_mixed_sampling_settings_in_one_batch(busy_server, tiny_llm):
    """A greedy request's answer does not change when a sampled request shares its batch."""
    greedy = {"model": TINY_NAME, "prompt": "The weather", "max_tokens": 40, "temperature": 0}
    alone = httpx.post(f"{busy_server}/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    client, response, cm = open_stream(busy_server, {**LONG, "temperature": 1.3, "top_k": 50, "seed": 1})
    next(response.iter_lines())
    together = httpx.post(f"{busy_server}/v1/completions", json=greedy, timeout=60).json()["choices"][0][
        "text"
    ]
    cm.__exit__(None, None, None)
    client.close()
    assert together == alone
    assert alone == tiny_llm.generate("The weather", max_new_tokens=40)


def test_health_is_503_while_loading(tiny_llm, tiny_model_dir, monkeypatch):
    import llamalab.api

    release = threading.Event()

    def slow_load(*args, **kwargs):
        release.wait(30)
        return tiny_llm

    monkeypatch.setattr(llamalab.api, "load", slow_load)
    config = ServeConfig(ModelOptions(str(tiny_model_dir), context=128), port=0)
    with BackgroundServer(config, wait_for_model=False) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.json()["error"]["type"] == "service_unavailable"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").status_code == 200
        release.set()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_load_failure_is_reported(tiny_model_dir, tmp_path):
    config = ServeConfig(ModelOptions(str(tmp_path / "missing-model")), port=0)
    with BackgroundServer(config, wait_for_model=False) as url:
        wait_for(lambda: httpx.get(f"{url}/health").json().get("status") == "error")
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and "missing-model" in r.json()["error"]["message"]
