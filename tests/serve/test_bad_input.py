"""Bad input never gets a 500 and never stops the server: each is a 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from llamalab.model_options import ModelOptions
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig

from .serve_helpers import TINY_NAME, openai_client

API_KEY = "sk-test-123"
OK_CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_openai_error(
    r: httpx.Response, status: int, param: str | None = "", code: str | None = ""
) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert isinstance(err["type"], str)
    if param != "":
        assert err["param"] == param, err
    if code != "":
        assert err["code"] == code, err
    return err


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def post(url: str, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60, **kw)


def still_serving(url: str) -> None:
    r = post(url, "/v1/chat/completions", OK_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    "body, param, what",
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, "NaN"),
        (b"\xff\xfe", None, "UTF-8"),
        ({"messages": "hello"}, "messages", ""),
        ({"messages": []}, "messages", "empty"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens", "integer"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5.5}, "max_tokens", "integer"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens", "at least 1"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30}, "max_tokens", "context"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6},
            "max_completion_tokens",
            "",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", ""),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature", ""),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", ""),
        (
            {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e-9},
            "repetition_penalty",
            "",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e9},
            "repetition_penalty",
            "",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", ""),
        ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, "n", ""),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", ""),
        ({"messages": [{"role": "user", "content": "x"}], "seed": 2**70}, "seed", ""),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}, "stop", ""),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias", ""),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}}, "logit_bias", ""),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1000}}, "logit_bias", ""),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs", ""),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50},
            "top_logprobs",
            "",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            "stream_options",
            "",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate", "frobnicate"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", ""),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role", ""),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
            "text",
        ),
        ({"messages": [{"role": "user", "content": 42}]}, "messages", ""),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
            "response_format.type",
            "",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "strin"}},
                },
            },
            "response_format",
            "",
        ),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "context"),
        # A message needs its text (tool calls, the only reason OpenAI allows none, are not supported).
        ({"messages": [{"role": "user"}]}, "messages[0].content", "content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "content"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", "content"),
        # Token ids are plain decimal numbers: int() would also take spaces, signs, "_" and other digits.
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {" 12 ": 1}}, "logit_bias", "12"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"+12": 1}}, "logit_bias", ""),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1_2": 1}}, "logit_bias", ""),
        (
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"\uff11\uff12": 1}},
            "logit_bias",
            "",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {str(i): 1 for i in range(301)}},
            "logit_bias",
            "300",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [str(i) for i in range(17)]}, "stop", "16"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["x" * 1001]}, "stop", "1000"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": _schema({"$ref": "#"})},
            "response_format",
            "no json value",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": _schema({"type": "string", "minLength": 1000000000}),
            },
            "response_format",
            "minlength",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": _schema({"type": "object", "properties": {"a": {"minItems": 10**9}}}),
            },
            "response_format",
            "minitems",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": _schema({"enum": ["v" * 40 for _ in range(1000)]}),
            },
            "response_format",
            "bytes",
        ),
    ],
)
def test_chat_bad_input_is_a_400(tiny_server, body, param, what):
    err = assert_openai_error(post(tiny_server, "/v1/chat/completions", body), 400, param)
    assert what.lower() in err["message"].lower()
    assert err["type"] == "invalid_request_error"


def test_context_length_code(tiny_server):
    r = post(tiny_server, "/v1/completions", {"prompt": "word " * 400, "max_tokens": 2})
    assert_openai_error(r, 400, "prompt", "context_length_exceeded")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 99999999]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_completion_bad_input_is_a_400(tiny_server, body, param):
    assert_openai_error(post(tiny_server, "/v1/completions", body), 400, param)


def test_unknown_model_is_a_404(tiny_server):
    err = assert_openai_error(
        post(tiny_server, "/v1/chat/completions", {**OK_CHAT, "model": "gpt-17"}),
        404,
        "model",
        "model_not_found",
    )
    assert "gpt-17" in err["message"]
    client = openai_client(tiny_server)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert_openai_error(httpx.get(f"{tiny_server}/v1/models/nope"), 404)


def test_routes_and_methods(tiny_server):
    assert_openai_error(httpx.get(f"{tiny_server}/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{tiny_server}/v1/chat/completions"), 405)
    assert_openai_error(post(tiny_server, "/tokenize", {"prompt": "a", "messages": []}), 400)
    assert_openai_error(post(tiny_server, "/detokenize", {"tokens": [10**9]}), 400, "tokens")
    assert_openai_error(post(tiny_server, "/detokenize", {"tokens": "abc"}), 400, "tokens")


def test_oversized_bodies_get_413(tiny_server):
    big = {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_openai_error(post(tiny_server, "/v1/chat/completions", big), 413)

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    r = httpx.post(
        f"{tiny_server}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 413)
    still_serving(tiny_server)


def test_openai_client_raises_typed_errors(tiny_server):
    client = openai_client(tiny_server)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=TINY_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=-5
        )
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)


def test_random_garbage_never_gives_500(tiny_server):
    """A bounded fuzz: mutate a valid request in type-confused ways; all must be 2xx or 4xx."""
    rng = random.Random(0)
    values = [
        None,
        True,
        -1,
        0,
        1.5,
        1e-300,
        1e300,
        10**40,
        "",
        "x",
        [],
        {},
        [1],
        ["a"],
        {"a": 1},
        -(10**40),
        "\u0000",
    ]
    fields = list(OK_CHAT) + [
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "logit_bias",
        "response_format",
        "stream",
        "stream_options",
        "top_k",
        "min_p",
        "presence_penalty",
        "repetition_penalty",
    ]
    for _ in range(60):
        body = dict(OK_CHAT)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(values)
        r = post(tiny_server, "/v1/chat/completions", body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert_openai_error(r, r.status_code)
    still_serving(tiny_server)


@pytest.fixture(scope="module")
def keyed_server(tiny_llm, tiny_model_dir):
    config = ServeConfig(
        ModelOptions(str(tiny_model_dir), context=128), served_model_name=TINY_NAME, port=0, api_key=API_KEY
    )
    with BackgroundServer(config, tiny_llm) as url:
        yield url


def test_api_key_is_required(keyed_server):
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": API_KEY},
        {"authorization": "Basic x"},
    ):
        r = post(keyed_server, "/v1/chat/completions", OK_CHAT, headers=headers)
        err = assert_openai_error(r, 401, code="invalid_api_key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.get(f"{keyed_server}/v1/models"), 401)
    assert_openai_error(httpx.get(f"{keyed_server}/metrics"), 401)
    assert httpx.get(f"{keyed_server}/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai_client(keyed_server, api_key="wrong").models.list()
    good = openai_client(keyed_server, api_key=API_KEY)
    assert good.chat.completions.create(model=TINY_NAME, messages=OK_CHAT["messages"], max_tokens=2).choices


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udc00"]}',
            "stop[0]",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "\\ud800": 1}', None),
        ("/v1/completions", b'{"prompt": "a\\udfffb", "max_tokens": 2}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "a\\udfff"], "max_tokens": 2}', "prompt[1]"),
        ("/tokenize", b'{"prompt": "a\\ud800"}', "prompt"),
    ],
)
def test_lone_surrogates_are_a_400(tiny_server, caplog, path, body, param):
    """JSON may escape half of a UTF-16 pair (`\\ud800`); that is not text, and the tokenizer refuses it."""
    err = assert_openai_error(post(tiny_server, path, body), 400)
    assert "surrogate" in err["message"]
    if param is not None:
        assert err["param"] == param
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no traceback logged
    # A well-formed pair of escapes is one character and works.
    ok = post(tiny_server, "/tokenize", b'{"prompt": "\\ud83d\\ude00"}')
    assert ok.status_code == 200 and ok.json()["count"] >= 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "text/json"])
def test_a_body_that_is_not_declared_json_is_a_415(tiny_server, content_type):
    r = post(tiny_server, "/v1/chat/completions", OK_CHAT, headers={"content-type": content_type})
    err = assert_openai_error(r, 415)
    assert "Content-Type" in err["message"] and content_type in err["message"]
    for fine in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert (
            post(tiny_server, "/v1/chat/completions", OK_CHAT, headers={"content-type": fine}).status_code
            == 200
        )
    # No Content-Type at all is read as JSON (some clients send none).
    r = httpx.post(f"{tiny_server}/v1/chat/completions", content=json.dumps(OK_CHAT).encode(), timeout=60)
    assert r.status_code == 200


def test_the_largest_logit_bias_is_accepted(tiny_server):
    body = {**OK_CHAT, "logit_bias": {str(i): -1.5 for i in range(300)}, "temperature": 0}
    assert post(tiny_server, "/v1/chat/completions", body).status_code == 200
