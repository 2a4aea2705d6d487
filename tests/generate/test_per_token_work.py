"""A decode step costs the engine thread no more for the largest request than for the smallest.

The engine thread serves every client: if a request's per-token work grows with its size (a Python loop
over a 49k-entry logit_bias, a Counter over the whole answer, stop strings scanned from the start), one client
slows every stream in the batch. Measured without clocks, on one decode step of a sequence in the same
state: Python line events (loops written in Python) and Python memory allocated (copies of the context).
"""

from __future__ import annotations

import pytest

from llamalab.generate.sampling import SamplingParams
from tests.costs import allocated_bytes, line_events
from tests.tiny import tiny_chat_llm


@pytest.fixture(scope="module")
def llm():
    return tiny_chat_llm(context=2048)


def step_costs(llm, prompt: list[int], params: SamplingParams) -> tuple[int, int]:
    """(line events, bytes allocated) of one decode step, after a few warm-up steps."""
    engine = llm.engine(max_batch=1, max_len=len(prompt) + 64)
    engine.add(prompt, params)
    for _ in range(4):
        engine.step()
    lines = line_events(engine.step)
    memory = allocated_bytes(engine.step)
    assert engine.active, "the sequence ended before it was measured"
    return lines, memory


def test_the_largest_request_costs_a_step_no_more_than_the_smallest(llm):
    # Both generate the same token every step (a bias of +100 on it), so the only difference between them
    # is how large each request is: its logit_bias, stop strings, top logprobs and context.
    forced = llm.encode(" the")[0]
    common = dict(
        max_new_tokens=60,
        temperature=0.8,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=0,
        ignore_eos=True,
    )
    small = SamplingParams(logit_bias={forced: 100.0}, stop=["\x01"], logprobs=1, **common)
    others = [t for t in range(llm.config.vocab_size) if t != forced][:299]
    large = SamplingParams(
        logit_bias={forced: 100.0, **{t: -0.5 for t in others}},
        stop=[chr(2 + i) * 1000 for i in range(16)],
        logprobs=20,
        **common,
    )
    text = llm.decode(list(range(3, 400)))
    small_cost = step_costs(llm, llm.encode(text)[:8], small)
    large_cost = step_costs(llm, (llm.encode(text) * 20)[:1500], large)
    assert large_cost[0] <= small_cost[0], f"Python lines per step: {large_cost[0]} vs {small_cost[0]}"
    assert large_cost[1] <= small_cost[1] + 2048, (
        f"bytes allocated per step: {large_cost[1]} vs {small_cost[1]}"
    )
