"""Losses from hidden states, with the head applied in chunks so the full (tokens x vocabulary) logits never
exist: SmolLM2's head is 49152 wide, so 4K tokens of fp32 logits would be 0.8 GB (litgpt's
`chunked_cross_entropy`, torchtune's `CEWithChunkedOutputLoss`).

Each chunk's head + cross-entropy runs under non-reentrant activation checkpointing: the forward keeps only
the chunk's hidden states, the backward recomputes its logits, so peak memory holds one chunk of logits.
Losses are sums (token counts are the caller's denominators, known before the forward), never means of
means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llamalab.train.data import IGNORE


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum over positions of -log p(label) with logits = head(hidden), `chunk` positions at a time;
    hidden (N, d), labels (N,) with IGNORE where nothing is trained."""
    keep = labels != IGNORE
    hidden, labels = hidden[keep], labels[keep]  # positions without a target cost no head computation
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, labels.numel(), chunk):
        h, y = hidden[s : s + chunk], labels[s : s + chunk]
        total = total + (
            checkpoint(_chunk_ce, head, h, y, use_reentrant=False)
            if h.requires_grad
            else _chunk_ce(head, h, y)
        )
    return total


def chunked_token_logprobs(head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(label) at each position (N,), 0 where the label is IGNORE, `chunk` positions at a time."""
    out = []
    for s in range(0, labels.numel(), chunk):
        h, y = hidden[s : s + chunk], labels[s : s + chunk]

        def piece(h, y):
            lp = torch.log_softmax(head(h).float(), dim=-1)
            return lp.gather(-1, y.clamp(min=0)[:, None])[:, 0] * (y != IGNORE)

        out.append(checkpoint(piece, h, y, use_reentrant=False) if h.requires_grad else piece(h, y))
    return torch.cat(out)
