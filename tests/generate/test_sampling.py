"""Sampling filters and penalties against transformers' logits processors, for batches with mixed settings."""

import pytest
import torch

from llamalab.generate.sampling import (
    SamplingParams,
    SamplingState,
    choose_tokens,
    make_generator,
    penalize,
    sample_row,
    sampling_candidates,
)


def kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    values, ids = sampling_candidates(logits, params)
    if ids is None:
        return set(torch.nonzero(torch.isfinite(values)).flatten().tolist())
    return set(ids.tolist())


def transformers_kept(logits: torch.Tensor, **settings) -> set[int]:
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = logits[None].clone()
    if settings.get("top_k"):
        x = TopKLogitsWarper(settings["top_k"])(None, x)
    if settings.get("top_p", 1.0) < 1.0:
        x = TopPLogitsWarper(settings["top_p"])(None, x)
    if settings.get("min_p"):
        x = MinPLogitsWarper(settings["min_p"])(None, x)
    return set(torch.nonzero(torch.isfinite(x[0])).flatten().tolist())


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 7},
        {"top_p": 0.8},
        {"min_p": 0.1},
        {"top_k": 40, "top_p": 0.7},
        {"top_k": 40, "min_p": 0.2},
        {"top_p": 0.9, "min_p": 0.05},
        {"top_k": 100, "top_p": 0.95, "min_p": 0.01},
    ],
)
def test_filters_keep_what_transformers_keeps(settings):
    for seed in range(5):
        logits = torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 3
        params = SamplingParams(temperature=1.0, **settings)
        assert kept(logits, params) == transformers_kept(logits, **settings)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0]).to(torch.bfloat16).float()
    assert kept(logits, SamplingParams(temperature=1.0, top_k=3)) == transformers_kept(logits, top_k=3)
    assert kept(logits, SamplingParams(temperature=1.0, top_k=3)) == {0, 1, 2, 3, 4}


def test_top_k_with_fewer_allowed_tokens_than_k():
    logits = torch.full((50,), float("-inf"))
    logits[[3, 9]] = torch.tensor([1.0, 2.0])
    assert kept(logits, SamplingParams(temperature=1.0, top_k=10)) == {3, 9}


def states_for(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]], vocab: int):
    states = [SamplingState.start(p, prompt, vocab) for p, prompt in zip(params, prompts)]
    for state, out in zip(states, outputs):
        for i, token in enumerate(out):
            state.observe(token, out[: i + 1])
    return states


def test_batched_penalties_equal_transformers_and_each_row_alone():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    vocab = 50
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 2
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(logit_bias={0: 5.0, 7: -3.0, 99: 1.0}),  # 99 is outside the vocabulary: ignored
        SamplingParams(),
    ]
    prompts = [[3, 7], [1, 2], [4], [5]]
    outputs = [[7, 20, 41], [2, 2, 2, 5], [9], [6]]
    states = states_for(params, prompts, outputs, vocab)
    out = penalize(logits, states)
    context = torch.tensor([prompts[0] + outputs[0]])
    torch.testing.assert_close(out[0], RepetitionPenaltyLogitsProcessor(1.3)(context, logits[:1].clone())[0])
    expected = logits[1].clone()
    expected[2] -= 0.5 + 0.25 * 3  # output tokens only: the prompt's 2 is not counted
    expected[5] -= 0.5 + 0.25
    torch.testing.assert_close(out[1], expected)
    expected = logits[2].clone()
    expected[0] += 5.0
    expected[7] -= 3.0
    torch.testing.assert_close(out[2], expected)
    torch.testing.assert_close(out[3], logits[3])
    for i in range(4):  # a row's result does not depend on the rest of the batch
        torch.testing.assert_close(out[i], penalize(logits[i : i + 1], states[i : i + 1])[0])


def test_greedy_with_bias_and_logprobs_of_the_raw_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    p = SamplingParams(logit_bias={0: 5.0}, logprobs=2)
    (token,), (lp,) = choose_tokens(logits, [SamplingState.start(p, [1], 3)], [[]])
    assert token == 0
    raw = torch.log_softmax(logits[0], -1)
    assert lp[0] == pytest.approx(float(raw[0]))
    assert [t for t, _ in lp[1]] == [2, 1] and lp[1][0][1] == pytest.approx(float(raw[2]))


def test_seed_reproducible_and_sampling_follows_distribution():
    p = SamplingParams(temperature=1.0)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    draws = [sample_row(logits, p, make_generator(123)) for _ in range(5)]
    assert len(set(draws)) == 1
    g = make_generator(0)
    counts = torch.bincount(torch.tensor([sample_row(logits, p, g) for _ in range(3000)]), minlength=3)
    torch.testing.assert_close(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)
    filtered = SamplingParams(temperature=1.0, top_k=2)  # sampling among candidates keeps the proportions
    counts = torch.bincount(torch.tensor([sample_row(logits, filtered, g) for _ in range(3000)]), minlength=3)
    torch.testing.assert_close(counts / 3000, torch.tensor([0.7 / 0.9, 0.2 / 0.9, 0.0]), atol=0.03, rtol=0)


def test_invalid_settings_are_refused():
    from llamalab.errors import LlamalabError

    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=-1), dict(min_p=2)]:
        with pytest.raises(LlamalabError):
            SamplingParams(**bad).validate()
