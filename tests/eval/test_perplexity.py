"""Perplexity: both protocols against transformers on the same real text, chunked == unchunked."""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.eval.perplexity import nonoverlap_windows, perplexity, sliding_windows

SEQ, STRIDE, WINDOWS = 256, 128, 3


def test_nonoverlap_windows_drop_the_tail():
    w = nonoverlap_windows(1000, 256)
    assert [(x.begin, x.end, x.score_from) for x in w] == [(0, 256, 1), (256, 512, 257), (512, 768, 513)]


def test_sliding_windows_predict_every_token_once():
    for n, L, s in [(1000, 256, 128), (300, 256, 100), (257, 256, 1), (1000, 256, 255)]:
        w = sliding_windows(n, L, s)
        scored = [t for x in w for t in range(x.score_from, x.end)]
        assert scored == list(range(1, n)), (n, L, s)
        assert all(x.end - x.begin <= L for x in w) and w[-1].end == n
    # stride == seq_len: as in the guide, a window's first token has no context in it and is not scored,
    # so this is the non-overlapping protocol plus the last partial window.
    w = sliding_windows(1000, 256, 256)
    assert [(x.begin, x.end, x.score_from) for x in w][:3] == [
        (x.begin, x.end, x.score_from) for x in nonoverlap_windows(1000, 256)
    ]
    assert (w[-1].begin, w[-1].end, w[-1].score_from) == (768, 1000, 769)
    with pytest.raises(LlamalabError, match="--stride"):
        sliding_windows(100, 10, 11)


@pytest.fixture(scope="module")
def alice_ids(smollm, alice_text):
    return smollm.encode(alice_text)


def _hf_window_nll(hf_model, ids: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """transformers' per-token NLL (float64) of tokens begin+1 .. end-1 given the window."""
    with torch.no_grad():
        logits = hf_model(ids[None, begin:end]).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], ids[begin + 1 : end], reduction="none").double()


@pytest.mark.slow
def test_nonoverlap_matches_transformers(smollm, hf_model, alice_ids):
    ours = perplexity(smollm, alice_ids, seq_len=SEQ, max_windows=WINDOWS)
    ids = torch.tensor(alice_ids)
    # GPTQ's own formula: per-window mean CE (labels shifted inside the model) x seqlen, exp of the average.
    nlls = []
    with torch.no_grad():
        for i in range(WINDOWS):
            w = ids[None, i * SEQ : (i + 1) * SEQ]
            nlls.append(float(hf_model(w, labels=w).loss) * SEQ)
    ref = math.exp(sum(nlls) / (WINDOWS * SEQ))
    assert ours.windows == WINDOWS and ours.tokens == WINDOWS * (SEQ - 1)
    assert abs(ours.ppl - ref) / ref < 1e-3
    assert abs(ours.ppl - ref) / ref < 1e-5  # in fact it agrees to float precision


@pytest.mark.slow
def test_sliding_matches_transformers(smollm, hf_model, alice_ids):
    ours = perplexity(smollm, alice_ids, seq_len=SEQ, stride=STRIDE, max_windows=WINDOWS)
    ids = torch.tensor(alice_ids)
    exact_sum, exact_n = 0.0, 0
    guide_sum, guide_n, prev_end = 0.0, 0, 0
    ours_guide_sum = 0.0
    for i, begin in enumerate(range(0, len(alice_ids), STRIDE)[:WINDOWS]):
        # The transformers guide's loop; `scored` is what labels=target_ids averages over.
        end = min(begin + SEQ, len(alice_ids))
        trg_len = end - prev_end
        nll = _hf_window_nll(hf_model, ids, begin, end)
        scored = nll[-trg_len:] if trg_len < end - begin else nll  # labels[:, :-trg_len] = -100, then shifted
        exact_sum, exact_n = exact_sum + float(scored.sum()), exact_n + scored.numel()
        num_loss_tokens = min(trg_len, end - begin) - 1  # the guide's count: valid labels - batch size
        guide_sum += float(scored.mean()) * num_loss_tokens
        guide_n += num_loss_tokens
        ours_guide_sum += ours.window_nll[i] * num_loss_tokens
        prev_end = end
    exact, guide = math.exp(exact_sum / exact_n), math.exp(guide_sum / guide_n)
    assert ours.tokens == exact_n == SEQ - 1 + (WINDOWS - 1) * STRIDE
    assert abs(ours.ppl - exact) / exact < 1e-5  # the same token NLLs, summed exactly
    # The guide's code weights each window's mean loss by (scored tokens - 1) after the first window, an
    # approximation that moves the result by ~1/stride per window (0.13 % here, less at its stride 512).
    # Weighted the same way, our window NLLs give its number too.
    assert abs(math.exp(ours_guide_sum / guide_n) - guide) / guide < 1e-5


@pytest.mark.slow
def test_chunked_through_the_dense_cache_equals_one_pass(smollm, alice_ids):
    whole = perplexity(smollm, alice_ids, seq_len=128, max_windows=2)
    chunked = perplexity(smollm, alice_ids, seq_len=128, max_windows=2, chunk_size=32)
    assert whole.tokens == chunked.tokens == 2 * 127
    assert abs(chunked.ppl - whole.ppl) / whole.ppl < 1e-5
    # Sliding protocol, with a chunk size that does not divide the window.
    sliding = perplexity(smollm, alice_ids, seq_len=128, stride=64, max_windows=2)
    sliding_chunked = perplexity(smollm, alice_ids, seq_len=128, stride=64, max_windows=2, chunk_size=48)
    assert abs(sliding_chunked.ppl - sliding.ppl) / sliding.ppl < 1e-5


@pytest.mark.slow
def test_short_text_and_long_window_are_clear_errors(smollm, alice_ids):
    with pytest.raises(LlamalabError, match="fewer than one window of 256"):
        perplexity(smollm, alice_ids[:100], seq_len=256)
    with pytest.raises(LlamalabError, match="beyond the model's context of 8192"):
        perplexity(smollm, alice_ids, seq_len=16384)
