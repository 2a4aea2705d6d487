"""XL3M: segment-wise inference that fits a context longer than the trained length into it.

Paper: "XL3M: A Training-free Framework for LLM Length Extension Based on Segment-wise Inference", Wang et al.,
arXiv 2405.17755. No reference code is public; this follows the paper's description:
- The "question" is the last tokens of the context (`question_len`, a few tokens from its end).
- The rest is cut into independent segments (`segment_len` tokens); each sub-context is one segment followed
  by the question, scored in one forward pass by the model's certainty on the question span.
- The segments most relevant to the question (most certain) are spliced in their original (chronological)
  order into a key context, no longer than the budget (by default the trained length minus the question and
  the tokens to generate), and the model answers from key context + question.

The question's length matters more than anything else here: its positions are where the certainty is read,
and every position that repeats the text before it is predicted confidently whatever the segment holds. On
16K-token passkey prompts (seed 7, not the study's) the key's segment ranked first among 32 on 8 of 8 prompts
with an 8-token question, and 0-10th with 16; with 32 tokens, mostly filler, the study found it 1st-25th. So
the default is 8 tokens, the paper's "a few tokens".

Scorers: `entropy` (default; the paper's certainty: mean entropy of the predicted next-token distribution at
the question positions, lower = more relevant) and `nll` (mean negative log-likelihood of the question tokens
given the segment, the conditional-probability reading). Not verified against the paper's text (it was not
readable here): its exact averaging of the certainty, its segment length and whether it selects by top-k or a
threshold; we fill the budget with the most certain segments, which is a top-k whose k is set by the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamalab.errors import LlamalabError


@dataclass
class XL3MConfig:
    segment_len: int = 512
    question_len: int = 8  # "a few tokens from the end" (see the module's note on why not more)
    key_len: int | None = None  # budget of the key context + question (default: trained length - new tokens)
    scorer: str = "entropy"  # entropy | nll
    batch_size: int = 8

    def check(self) -> XL3MConfig:
        if self.scorer not in ("entropy", "nll"):
            raise LlamalabError(f"--xl3m-scorer must be entropy or nll, got {self.scorer!r}")
        if self.segment_len < 1 or self.question_len < 1:
            raise LlamalabError("--xl3m-segment and --xl3m-question must be at least 1 token")
        if self.key_len is not None and self.key_len <= self.question_len:
            raise LlamalabError(f"--xl3m-key-len {self.key_len} leaves no room beside the question")
        return self


@dataclass
class Selection:
    ids: list[int]  # key context + question
    segments: list[tuple[int, int]]  # (start, end) of each selected segment in the original body
    scores: list[float]  # every segment's score, in order
    scored_tokens: int  # tokens run through the model to score
    bounds: list[tuple[int, int]] = field(default_factory=list)  # every segment's (start, end), in order


@torch.inference_mode()
def segment_scores(
    model, segments: list[list[int]], question: list[int], scorer: str, batch: int
) -> list[float]:
    """Each segment's score with `question` appended (lower = more relevant)."""
    device = next(model.parameters()).device
    q = len(question)
    out: list[float] = [0.0] * len(segments)
    # Equal-length segments share a batch (only the last one is shorter).
    by_len: dict[int, list[int]] = {}
    for i, seg in enumerate(segments):
        by_len.setdefault(len(seg), []).append(i)
    for n, idx in by_len.items():
        for b in range(0, len(idx), batch):
            rows = idx[b : b + batch]
            ids = torch.tensor([segments[i] + question for i in rows], device=device)
            hidden = model(ids, hidden=True)[:, n - 1 : n + q - 1]  # the positions that predict the question
            logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)  # (B, q, V)
            if scorer == "entropy":
                score = -(logp.exp() * logp).sum(-1).mean(-1)
            else:
                target = torch.tensor(question, device=device).expand(len(rows), q)
                score = -logp.gather(-1, target[..., None])[..., 0].mean(-1)
            for r, i in enumerate(rows):
                out[i] = float(score[r])
    return out


def select(model, ids: list[int], config: XL3MConfig, max_new_tokens: int = 0) -> Selection:
    """XL3M's key context for the prompt `ids` (returned unchanged when it already fits the budget)."""
    config.check()
    budget = config.key_len or model.config.max_position_embeddings
    budget -= max_new_tokens if config.key_len is None else 0
    q = min(config.question_len, len(ids) - 1)
    if len(ids) <= budget:
        return Selection(list(ids), [(0, len(ids) - q)], [], 0)
    if config.segment_len + q > (config.key_len or model.config.max_position_embeddings):
        raise LlamalabError(f"--xl3m-segment {config.segment_len} + question does not fit the trained length")
    body, question = ids[:-q], ids[-q:]
    bounds = [(s, min(s + config.segment_len, len(body))) for s in range(0, len(body), config.segment_len)]
    scores = segment_scores(model, [body[a:b] for a, b in bounds], question, config.scorer, config.batch_size)
    room, chosen = budget - q, []
    for i in sorted(range(len(bounds)), key=lambda i: scores[i]):  # most certain first
        size = bounds[i][1] - bounds[i][0]
        if size <= room:
            chosen.append(i)
            room -= size
    chosen.sort()  # chronological splicing
    key = [t for i in chosen for t in body[bounds[i][0] : bounds[i][1]]]
    scored = sum(b - a + q for a, b in bounds)
    return Selection(key + question, [bounds[i] for i in chosen], scores, scored, bounds)


class XL3MReducer:
    """A prompt reducer for the eval harness and `generate`: XL3M's key context in place of the prompt."""

    def __init__(self, llm, config: XL3MConfig) -> None:
        self.llm, self.config = llm, config.check()
        self.last: Selection | None = None

    def __call__(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self.last = select(self.llm.model, ids, self.config, max_new_tokens)
        return self.last.ids

    def describe(self) -> dict:
        return {"method": "xl3m", **self.config.__dict__}
