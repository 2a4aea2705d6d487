"""What depends on a real model, on the embedded SmolLM2-135M: greedy parity with `llamalab generate`,
schema-valid JSON, and 16 concurrent streaming clients each getting exactly its sequential answer."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import openai
import pytest

from .serve_helpers import openai_client

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


def test_greedy_chat_equals_llamalab_generate(real_server, smollm, monkeypatch, capsys):
    """The server's greedy answer is exactly what `llamalab generate --chat` prints (the command runs
    in-process, with its model loader handed the already loaded model to save a second load)."""
    import llamalab.cli

    question = "What is the capital of France? Answer in one sentence."
    monkeypatch.setattr(llamalab.cli, "load_model", lambda opts: smollm)
    assert llamalab.cli.main(["generate", "--chat", "--prompt", question, "--max-new-tokens", "24"]) == 0
    expected = capsys.readouterr().out[:-1]  # the command ends its output with a newline
    r = openai_client(real_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    assert r.choices[0].message.content == expected
    assert "Paris" in expected


def test_greedy_completion_equals_generate(real_server, smollm):
    prompt = "Alice was beginning to get very tired of sitting by her sister on the bank,"
    r = openai_client(real_server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0
    )
    assert r.choices[0].text == smollm.generate(prompt, max_new_tokens=20)


def test_json_schema_output_validates(real_server):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string"},
            "population_millions": {"type": "number"},
            "landmarks": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["city", "country", "population_millions", "landmarks"],
        "additionalProperties": False,
    }
    client = openai_client(real_server)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": "Describe Paris as JSON with city, country, population and landmarks.",
            }
        ],
        max_tokens=150,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    data = json.loads(choice.message.content)
    jsonschema.validate(data, schema)
    assert "Paris" in data["city"]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        max_tokens=300,  # it closes its object in ~20 tokens; room for other CPUs' samples to differ
        temperature=0.8,
        seed=7,
        stream=True,
        response_format={"type": "json_object"},
    )
    text, finish = "", None
    for ev in stream:
        for c in ev.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


PROMPTS = [
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Name three colours.",
    "Why is the sky blue?",
    "Give me a tip for learning Python.",
    "What is the capital of Japan?",
    "Describe a cat in one sentence.",
    "Say hello in French.",
    "What do bees make?",
    "Tell me a fun fact about space.",
    "How many legs does a spider have?",
    "Suggest a name for a dog.",
    "What is the boiling point of water?",
    "Recommend a book.",
    "What is photosynthesis?",
    "Translate 'thank you' into Spanish.",
]


def test_sixteen_concurrent_streams_match_their_sequential_results(real_server):
    client = openai_client(real_server)
    lengths = [
        12 + (i % 4) * 4 for i in range(len(PROMPTS))
    ]  # different lengths: rows leave at different steps

    def ask(prompt: str, n: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0
        )
        return r.choices[0].message.content

    sequential = [ask(p, n) for p, n in zip(PROMPTS, lengths)]

    async def stream_one(aclient: openai.AsyncOpenAI, prompt: str, n: int, delay: float) -> tuple[str, str]:
        await asyncio.sleep(delay)  # staggered arrivals: requests join a batch that is already decoding
        text, finish = "", None
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=n,
            temperature=0,
            stream=True,
        )
        async for ev in stream:
            for c in ev.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish

    async def all_at_once() -> list[tuple[str, str]]:
        rng = random.Random(0)
        aclient = openai.AsyncOpenAI(base_url=f"{real_server}/v1", api_key="x", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(
                *(stream_one(aclient, p, n, rng.uniform(0, 0.5)) for p, n in zip(PROMPTS, lengths))
            )
        finally:
            await aclient.close()

    concurrent = asyncio.run(all_at_once())
    assert all(finish in ("stop", "length") for _, finish in concurrent)
    assert [text for text, _ in concurrent] == sequential
