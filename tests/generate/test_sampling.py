"""Sampling filters and penalties against transformers' logits processors."""

import pytest
import torch

from llamalab.generate.sampling import SamplingParams, make_generator, process_logits, sample_token, warp


def _kept(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("kind,value", [("top_k", 7), ("top_p", 0.8), ("min_p", 0.1)])
def test_filters_keep_what_transformers_keeps(kind, value):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ref = {"top_k": TopKLogitsWarper(7), "top_p": TopPLogitsWarper(0.8), "min_p": MinPLogitsWarper(0.1)}[kind]
    for seed in range(5):
        logits = torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 3
        ours = warp(logits, SamplingParams(temperature=1.0, **{kind: value}))
        theirs = ref(None, logits[None].clone())[0]
        assert torch.equal(_kept(ours), _kept(theirs))


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50)
    context = [3, 7, 7, 20, 41]
    ours = process_logits(logits, SamplingParams(repetition_penalty=1.3), context, n_prompt=2)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(10)
    out = process_logits(
        logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 2, 2, 2, 5], 2
    )
    assert out[1] == 0  # prompt token: untouched
    assert out[2] == pytest.approx(-(0.5 + 0.25 * 2))
    assert out[5] == pytest.approx(-(0.5 + 0.25 * 1))


def test_logit_bias_and_greedy():
    logits = torch.tensor([0.0, 1.0, 2.0])
    p = SamplingParams(logit_bias={0: 5.0})
    assert sample_token(process_logits(logits, p, [], 0), p, make_generator(0)) == 0


def test_seed_reproducible_and_sampling_follows_distribution():
    p = SamplingParams(temperature=1.0)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    draws = [sample_token(logits, p, make_generator(123)) for _ in range(5)]
    assert len(set(draws)) == 1
    g = make_generator(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, p, g) for _ in range(3000)]), minlength=3)
    torch.testing.assert_close(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_invalid_settings_are_refused():
    from llamalab.errors import LlamalabError

    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=-1), dict(min_p=2)]:
        with pytest.raises(LlamalabError):
            SamplingParams(**bad).validate()
