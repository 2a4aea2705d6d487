"""The training objectives: what a micro-batch's loss is, as a sum with its denominator.

- `clm` and `sft`: next-token cross-entropy over the labelled positions (every token for `clm`, assistant
  tokens for `sft`: the data's labels say which), summed; the denominator is the step's labelled tokens.
- `dpo` (Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290, eq. 7): with the summed
  log-probabilities of each response given its prompt, r = beta * [(log pi(y_w) - log ref(y_w)) -
  (log pi(y_l) - log ref(y_l))], loss = -log sigmoid(r) per pair; the denominator is the step's pairs. The
  reference log-probabilities are computed once, before training, by the initial model in eval mode, and
  cached on disk (TRL's `precompute_ref_log_probs`, kept across runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamalab.train.loss import chunked_cross_entropy, chunked_token_logprobs


def lm_loss(model, batch: dict[str, torch.Tensor], ce_chunk: int) -> torch.Tensor:
    """Summed next-token loss of a packed or padded micro-batch (documents kept apart)."""
    hidden = model(batch["input_ids"], doc_ids=batch["doc_ids"], hidden=True)  # (B, T, d)
    head = _head(model)
    return chunked_cross_entropy(head, hidden.flatten(0, 1), batch["labels"].flatten(), ce_chunk)


def sequence_logprobs(model, batch: dict[str, torch.Tensor], ce_chunk: int) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (B,)."""
    hidden = model(batch["input_ids"], doc_ids=batch["doc_ids"], hidden=True)
    B, T = batch["labels"].shape
    lp = chunked_token_logprobs(_head(model), hidden.flatten(0, 1), batch["labels"].flatten(), ce_chunk)
    return lp.view(B, T).sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Summed DPO loss of pairs from the (2P,) log-probabilities [chosen..., rejected...] of the policy and
    the reference; also the pairs' mean reward margin and accuracy (chosen reward above rejected)."""
    P = policy.shape[0] // 2
    chosen = beta * (policy[:P] - reference[:P])
    rejected = beta * (policy[P:] - reference[P:])
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).sum()
    return loss, {"margin_sum": float(margin.detach().sum()), "correct": float((margin > 0).sum())}


def _head(model):
    # The head of the underlying Transformer (DDP and FSDP wrap it; LoRA may wrap the head itself).
    inner = getattr(model, "module", model)
    return inner.lm_head
