"""Passkey and needle: LongRoPE's prompt and length search, the needle insertion, and short real runs."""

from __future__ import annotations

import random

import pytest

from llamalab.errors import ContextLengthError
from llamalab.eval.needle import insert_needle, score_reply
from llamalab.eval.passkey import GARBAGE, evaluate_passkey, first_integer, garbage_budgets, generate_prompt


def test_passkey_prompt_is_longropes():
    prompt, key, depth = generate_prompt(400, random.Random(42))
    lines = prompt.split("\n")
    assert len(lines) == 5
    assert lines[0].startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert lines[4] == "What is the pass key? The pass key is"
    assert len(lines[1]) + len(lines[3]) == 400 and GARBAGE.startswith(lines[1][:50])
    assert 1 <= key <= 50000 and depth == pytest.approx(len(lines[1]) / 400)
    # The same draws as LongRoPE's `random.seed(42)`: randint for the split, then for the key.
    rng = random.Random(42)
    assert (len(lines[1]), key) == (rng.randint(0, 400), rng.randint(1, 50000))


def test_first_integer():
    assert first_integer(" 12345. Remember it.") == 12345
    assert first_integer("no digits") is None


def test_needle_insertion_backs_off_to_a_sentence_end():
    period = 9
    context = [1, 2, 9, 3, 4, 5, 9, 6, 7]
    assert insert_needle(context, [100], 50, {period}) == [1, 2, 9, 100, 3, 4, 5, 9, 6, 7]
    assert insert_needle(context, [100], 0, {period}) == [100, *context]
    assert insert_needle(context, [100], 100, {period}) == [*context, 100]


def test_needle_scoring():
    assert score_reply(
        "You should eat a sandwich and sit in Dolores Park.", "eat a sandwich and sit in Dolores Park"
    ) == (True, 1.0)
    hit, recall = score_reply("Go to Dolores Park.", "eat a sandwich and sit in Dolores Park")
    assert not hit and recall == pytest.approx(2 / 8)


@pytest.mark.slow
def test_passkey_budgets_fit_the_lengths(smollm):
    rng = random.Random(42)
    budgets = garbage_budgets(smollm.tokenizer, [512, 1024], rng, reserve=10)
    for target, budget in zip([512, 1024], budgets):
        n = len(smollm.encode(generate_prompt(budget, random.Random(0))[0]))
        assert target - 10 - 60 < n < target - 10  # the largest 128-character step below the target


@pytest.mark.slow
def test_passkey_and_needle_on_the_default_model(smollm, alice_text):
    result = evaluate_passkey(smollm, [320], trials=2)
    assert result.accuracy == [1.0]  # SmolLM2-135M retrieves the key at this length (greedy, fp32)
    assert all(r["prompt_tokens"] + 10 <= 320 for r in result.records)
    from llamalab.eval.needle import evaluate_needle

    grid = evaluate_needle(smollm, alice_text, [320], [0, 100], max_new_tokens=24)
    assert grid.hit == [[1.0], [1.0]]
    assert all(r["prompt_tokens"] + 24 <= 320 for r in grid.records)
    with pytest.raises(ContextLengthError):
        evaluate_passkey(smollm, [16384], trials=1)


@pytest.mark.slow
def test_greedy_reuses_the_shared_prefix_exactly(smollm, alice_text):
    from llamalab.eval.forward import Forward

    ids = smollm.encode(alice_text)[:200]
    a, b = ids[:150], ids[:120] + ids[160:190]  # b shares its first 120 tokens with a
    fwd = Forward(smollm, scores_need_cache=False)
    fwd.greedy(a, 4)
    reused = fwd.greedy(b, 6)
    assert fwd.reused_tokens == 120
    assert reused == Forward(smollm, scores_need_cache=False).greedy(b, 6)
