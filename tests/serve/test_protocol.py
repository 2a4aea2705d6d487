"""The OpenAI protocol, spoken by the official `openai` client and by raw HTTP, against a real server on a
loopback port (tiny model: the point here is the protocol, not the text)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from .serve_helpers import TINY_NAME, openai_client


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai_client(tiny_server)


def chat(content: str = "Say something.") -> list[dict]:
    return [{"role": "user", "content": content}]


def test_health_models_and_model_card(tiny_server, client):
    assert httpx.get(f"{tiny_server}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_NAME]
    card = client.models.retrieve(TINY_NAME)
    assert card.id == TINY_NAME and card.owned_by == "llamalab"
    assert httpx.get(f"{tiny_server}/v1/models").json()["data"][0]["max_model_len"] == 256


def test_chat_non_streaming_usage_and_shape(tiny_server, client, tiny_llm):
    messages = chat()
    r = client.chat.completions.create(model=TINY_NAME, messages=messages, max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == TINY_NAME
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tiny_llm.chat_ids(messages))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 7
    # The same prompt through the engine directly gives the same greedy text.
    expected = tiny_llm.generate_sequences([tiny_llm.chat_ids(messages)], max_new_tokens=7)[0]
    assert choice.message.content == expected.text
    assert r.usage.completion_tokens == len(expected.output_ids)


def test_completion_accepts_every_prompt_form(client, tiny_llm):
    ids = tiny_llm.encode("The cat sat")
    by_text = client.completions.create(model=TINY_NAME, prompt="The cat sat", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(
        model=TINY_NAME, prompt=["The cat sat", "A dog"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: n copies agree
    assert by_text.choices[0].text.startswith(batch.choices[0].text)
    assert batch.usage.prompt_tokens == len(ids) + len(tiny_llm.encode("A dog"))
    nested = client.completions.create(model=TINY_NAME, prompt=[ids, ids], max_tokens=3, temperature=0)
    assert nested.choices[0].text == nested.choices[1].text


def test_chat_stream_event_order_and_usage(tiny_server, tiny_llm):
    body = {
        "model": TINY_NAME,
        "messages": chat(),
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = chunks[-2]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])  # "all other chunks ... usage null"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    expected = tiny_llm.generate_sequences([tiny_llm.chat_ids(chat())], max_new_tokens=6)[0].text
    assert content == expected


def test_stream_with_openai_client_matches_non_streaming(client):
    kw = dict(model=TINY_NAME, messages=chat("Count."), max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces, finish, usage = [], None, None
    for ev in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ev.usage:
            usage = ev.usage
        for c in ev.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole
    assert finish in ("stop", "length") and usage.completion_tokens >= 1


def test_completion_stream(client):
    kw = dict(model=TINY_NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    stream = list(client.completions.create(stream=True, **kw))
    assert all(ev.object == "text_completion" for ev in stream)
    assert "".join(c.text for ev in stream for c in ev.choices) == whole
    assert stream[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_are_cut_and_never_leaked(client):
    kw = dict(model=TINY_NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 8
    stop = full[5:8]  # a string that really occurs in the greedy continuation
    cut = client.completions.create(stop=[stop, "never-occurs"], **kw).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(
        c.text for ev in client.completions.create(stop=stop, stream=True, **kw) for c in ev.choices
    )
    assert streamed == cut.text and stop not in streamed


def test_seed_makes_sampling_reproducible_and_n_gives_distinct_choices(client):
    kw = dict(model=TINY_NAME, messages=chat(), max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, n=3, **kw)
    b = client.chat.completions.create(seed=1234, n=3, **kw)
    texts_a = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts_a == [c.message.content for c in b.choices]
    assert len(set(texts_a)) > 1  # each choice is its own sequence (seed + i)
    other = client.chat.completions.create(seed=99, n=1, **kw).choices[0].message.content
    assert other != texts_a[0]
    assert 3 <= a.usage.completion_tokens <= 36


def test_chat_logprobs(client, tiny_llm):
    r = client.chat.completions.create(
        model=TINY_NAME, messages=chat(), max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length"  # the tiny model's greedy answer is longer
    assert len(content) == r.usage.completion_tokens == 5  # one entry per generated token
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert bytes(item.bytes).decode("utf-8", "replace")
    assert "".join(bytes(i.bytes).decode("utf-8", "replace") for i in content) == r.choices[0].message.content
    logits = tiny_llm.logits(tiny_llm.chat_ids(chat()))[-1]
    assert content[0].logprob == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-4)
    # An answer ended by EOS: the EOS token counts as generated but is not part of the answer, so it has no entry.
    eos = str(tiny_llm.tokenizer.eos_token_id)
    r = client.chat.completions.create(
        model=TINY_NAME, messages=chat(), max_tokens=5, temperature=0, logprobs=True, logit_bias={eos: 100}
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1 and r.choices[0].logprobs.content == []


def test_completion_logprobs(client):
    r = client.completions.create(model=TINY_NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[tok] == pytest.approx(value) and 2 <= len(top) <= 3


def test_structured_output_even_from_a_random_model(client):
    """A random model cannot write JSON by itself; the grammar makes every output valid anyway."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=TINY_NAME,
        messages=chat("A person as JSON."),
        max_tokens=120,
        temperature=0.7,
        seed=3,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_from_a_random_model(client, tiny_llm):
    """A random model writes an endless key; biased towards quotes and braces, it closes the object and stops."""

    def json_object(max_tokens: int, logit_bias: dict | None = None):
        return client.chat.completions.create(
            model=TINY_NAME,
            messages=chat("JSON please."),
            max_tokens=max_tokens,
            temperature=0,
            response_format={"type": "json_object"},
            logit_bias=logit_bias,
        ).choices[0]

    quote, brace = tiny_llm.encode('"') + tiny_llm.encode("}")
    done = json_object(60, {str(quote): 100, str(brace): 100})
    assert done.finish_reason == "stop" and isinstance(json.loads(done.message.content), dict)
    short, longer = json_object(20), json_object(60)  # cut by max_tokens: the same object, not yet closed
    assert short.finish_reason == longer.finish_reason == "length"
    assert short.message.content.startswith('{"') and longer.message.content.startswith(short.message.content)


def test_tokenize_detokenize(tiny_server, tiny_llm):
    r = httpx.post(f"{tiny_server}/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tiny_llm.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    r = httpx.post(f"{tiny_server}/tokenize", json={"messages": chat("hi")}).json()
    assert r["tokens"] == tiny_llm.chat_ids(chat("hi"))
    back = httpx.post(f"{tiny_server}/detokenize", json={"tokens": tiny_llm.encode("Hello world")}).json()
    assert back == {"prompt": "Hello world"}


def test_list_of_parts_content_and_developer_role(client, tiny_llm):
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    r = client.chat.completions.create(model=TINY_NAME, messages=messages, max_tokens=4, temperature=0)
    as_text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    assert r.usage.prompt_tokens == len(tiny_llm.chat_ids(as_text))


def test_metrics_are_prometheus_text(tiny_server, client):
    client.completions.create(model=TINY_NAME, prompt="x", max_tokens=2)
    r = httpx.get(f"{tiny_server}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "llamalab_requests_total",
        "llamalab_prompt_tokens_total",
        "llamalab_generation_tokens_total",
        "llamalab_time_to_first_token_seconds_bucket",
        "llamalab_generation_tokens_per_second",
        "llamalab_queue_depth",
        "llamalab_running_sequences",
    ):
        assert f"\n{name}" in text, name
    assert 'llamalab_requests_total{endpoint="/v1/completions",status="200"}' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_extreme_but_valid_sampling_settings(client):
    """Values at the edges of the valid ranges work (a near-zero temperature is greedy, not an overflow)."""
    kw = dict(model=TINY_NAME, prompt="The sea", max_tokens=6)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert client.completions.create(temperature=1e-30, **kw).choices[0].text == greedy
    r = client.completions.create(
        temperature=2.0,
        top_p=1e-9,
        seed=1,
        presence_penalty=2,
        frequency_penalty=-2,
        **kw,
        extra_body={"repetition_penalty": 100, "min_p": 1.0, "top_k": 10**9},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_deltas_are_utf8_safe_and_add_up(client):
    """Random tokens include pieces of multi-byte characters; no delta may split one, so the streamed
    pieces, choice by choice, add up to exactly the non-streamed text (n=2, same seed)."""
    kw = dict(model=TINY_NAME, prompt="Ünïcödé ✓ 漢字", max_tokens=150, temperature=1.0, seed=5, n=2)
    whole = [c.text for c in client.completions.create(**kw).choices]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    for ev in client.completions.create(stream=True, **kw):
        for c in ev.choices:
            pieces[c.index].append(c.text)
    assert ["".join(pieces[0]), "".join(pieces[1])] == whole
    assert whole[0] != whole[1]
    assert any(ord(ch) > 127 for text in whole for ch in text)  # multi-byte characters did occur
    for piece in pieces[0] + pieces[1]:
        assert "\ufffd" not in piece or any("\ufffd" in w for w in whole)


def test_a_grammar_that_gives_up_partway_is_an_error_not_a_truncated_answer(tiny_server):
    """A schema can compile and still exceed the grammar engine's limits a few tokens in (here, an array of
    objects with 512 optional properties, after its "["); the answer then cannot be valid JSON."""
    item = {"type": "object", "properties": {f"k{i}": {"enum": ["alpha", "beta"]} for i in range(512)}}
    body = {
        "prompt": "x",
        "max_tokens": 20,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": {"type": "array", "items": item}},
        },
    }
    r = httpx.post(f"{tiny_server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "grammar engine gave up" in err["message"] and "response_format" in err["message"]
    with httpx.stream(
        "POST", f"{tiny_server}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert "grammar engine gave up" in events[-2] and events[-1] == "data: [DONE]"
