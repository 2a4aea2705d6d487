"""Sampling defaults a model ships in generation_config.json replace OpenAI's (temperature 1, top_p 1), and a
request's own settings replace those (tiny model, so greedy and sampled answers differ visibly)."""

from __future__ import annotations

import json
import shutil

import pytest

from llamalab.model_options import ModelOptions
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig

from .serve_helpers import TINY_NAME, openai_client


def answers(client, n_seeds: int = 3, **settings) -> list[str]:
    """The chat answer to one prompt under seeds 0..n-1 (sampling, if the settings sample, differs per seed)."""
    messages = [{"role": "user", "content": "Tell me something."}]
    return [
        client.chat.completions.create(
            model=TINY_NAME, messages=messages, max_tokens=8, seed=seed, **settings
        )
        .choices[0]
        .message.content
        for seed in range(n_seeds)
    ]


@pytest.mark.parametrize(
    "generation",
    [{"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"do_sample": True, "temperature": 0.0}],
    ids=["temperature-0", "top_k-1", "top_p-tiny", "with-other-keys"],
)
def test_generation_config_sets_the_defaults(tiny_model_dir, tmp_path, generation):
    import llamalab

    model_dir = tmp_path / "tiny-with-defaults"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    llm = llamalab.load(str(model_dir))
    config = ServeConfig(
        ModelOptions(str(model_dir), context=128), served_model_name=TINY_NAME, port=0, max_batch=2
    )
    with BackgroundServer(config, llm) as url:
        client = openai_client(url)
        greedy = answers(client, 1, temperature=0)[0]
        # Every default here leaves only the most likely token: each seed gives the greedy answer.
        assert answers(client) == [greedy] * 3
        # The request's own settings win: temperature 1, nothing cut off, samples differ from greedy.
        own = answers(client, temperature=1.0, top_p=1.0, extra_body={"top_k": 0})
        assert any(a != greedy for a in own), own
