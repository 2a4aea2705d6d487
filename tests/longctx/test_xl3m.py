"""XL3M: segment scoring by certainty, budget-filling selection in chronological order, and a real needle
that the default model finds in a haystack longer than the key budget."""

from __future__ import annotations

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.longctx.xl3m import XL3MConfig, segment_scores, select
from tests.tiny import hf_model, ours_from_hf


@pytest.fixture(scope="module")
def tiny():
    return ours_from_hf(hf_model(num_key_value_heads=2, max_position_embeddings=256))


def test_scores_are_the_certainty_on_the_question(tiny):
    torch.manual_seed(0)
    segments = [torch.randint(0, 512, (40,)).tolist() for _ in range(3)] + [
        torch.randint(0, 512, (17,)).tolist()
    ]
    question = torch.randint(0, 512, (6,)).tolist()
    batched = segment_scores(tiny, segments, question, "entropy", batch=2)
    for seg, got in zip(segments, batched):  # the slow, obvious computation of one sub-context at a time
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([seg + question]))[0, len(seg) - 1 : -1], -1)
        assert got == pytest.approx(float(-(logp.exp() * logp).sum(-1).mean()), rel=1e-4)
        nll = segment_scores(tiny, [seg], question, "nll", batch=1)[0]
        assert nll == pytest.approx(float(-logp[torch.arange(6), question].mean()), rel=1e-4)


def test_selection_fills_the_budget_with_the_best_segments_in_order(tiny, monkeypatch):
    import llamalab.longctx.xl3m as xl3m

    scores = [5.0, 1.0, 9.0, 0.5, 3.0, 7.0]  # segments 3, 1, 4 are the most certain
    monkeypatch.setattr(xl3m, "segment_scores", lambda *a, **k: scores)
    ids = list(range(6 * 10 + 4))  # six 10-token segments, then a 4-token question
    sel = select(tiny, ids, XL3MConfig(segment_len=10, question_len=4, key_len=4 + 30))
    assert sel.segments == [(10, 20), (30, 40), (40, 50)]  # chronological, not by score
    assert sel.ids == list(range(10, 20)) + list(range(30, 50)) + ids[-4:]
    # A prompt that fits is left alone.
    assert select(tiny, ids[:20], XL3MConfig(segment_len=10, question_len=4, key_len=64)).ids == ids[:20]


def test_bad_settings():
    with pytest.raises(LlamalabError, match="entropy or nll"):
        XL3MConfig(scorer="cosine").check()
    with pytest.raises(LlamalabError, match="leaves no room"):
        XL3MConfig(question_len=32, key_len=16).check()


@pytest.mark.slow
def test_default_model_finds_the_passkey_segment(smollm):
    # A passkey prompt of ~3K tokens, key budget 1K: the segment holding the key is among those kept.
    import random

    from llamalab.eval.passkey import generate_prompt

    prompt, key, _ = generate_prompt(10000, random.Random(5))
    ids = smollm.encode(prompt)
    sel = select(smollm.model, ids, XL3MConfig(segment_len=256, question_len=16, key_len=1024))
    assert len(sel.ids) <= 1024 and str(key) in smollm.decode(sel.ids)
