"""Losses against direct implementations: chunked cross-entropy, packed documents, DPO."""

import torch
import torch.nn.functional as F

from llamalab.train.data import IGNORE
from llamalab.train.loss import chunked_cross_entropy
from llamalab.train.objectives import dpo_loss, lm_loss, sequence_logprobs
from tests.tiny import hf_model, ours_from_hf


def test_chunked_cross_entropy_equals_the_full_one_with_equal_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = IGNORE
    full = F.cross_entropy(head(hidden), labels, ignore_index=IGNORE, reduction="sum")
    gh, gw = torch.autograd.grad(full, (hidden, head.weight))
    chunked = chunked_cross_entropy(head, hidden, labels, chunk=6)
    ch, cw = torch.autograd.grad(chunked, (hidden, head.weight))
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)


def test_a_packed_batch_gives_each_document_its_own_loss():
    model = ours_from_hf(hf_model(num_key_value_heads=2))
    docs = [torch.randint(0, 512, (n,)) for n in (9, 14, 6)]
    packed = torch.cat(docs)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    labels = torch.where(torch.cat([doc_ids[1:] == doc_ids[:-1], torch.tensor([False])]),
                         torch.cat([packed[1:], packed[:1]]), IGNORE)  # fmt: skip
    together = lm_loss(
        model, {"input_ids": packed[None], "labels": labels[None], "doc_ids": doc_ids[None]}, 8
    )
    alone = sum(F.cross_entropy(model(d[None])[0, :-1], d[1:], reduction="sum") for d in docs)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)


def test_dpo_loss_and_gradients_equal_the_papers_formula():
    torch.manual_seed(0)
    model = ours_from_hf(hf_model(num_key_value_heads=2))
    P, T, beta = 3, 10, 0.2
    ids = torch.randint(0, 512, (2 * P, T))
    labels = torch.cat([ids[:, 1:], torch.full((2 * P, 1), IGNORE)], dim=1)
    labels[:, :4] = IGNORE  # the prompt is not scored
    batch = {"input_ids": ids, "labels": labels, "doc_ids": torch.zeros_like(ids)}
    reference = torch.randn(2 * P)
    loss, stats = dpo_loss(sequence_logprobs(model, batch, ce_chunk=7), reference, beta)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    def logp(row):  # the direct formula: sum over response tokens of log softmax
        lp = torch.log_softmax(model(ids[row : row + 1])[0], dim=-1)
        return sum(lp[t, labels[row, t]] for t in range(T) if labels[row, t] != IGNORE)

    direct = 0.0
    for i in range(P):
        margin = beta * ((logp(i) - reference[i]) - (logp(P + i) - reference[P + i]))
        direct = direct - torch.log(torch.sigmoid(margin))
    expected = torch.autograd.grad(direct, list(model.parameters()))
    torch.testing.assert_close(loss, direct, atol=1e-4, rtol=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert 0 <= stats["correct"] <= P
