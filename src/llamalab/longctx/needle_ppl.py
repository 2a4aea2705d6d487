"""Needle-driven perplexity: LongRoPE2's search fitness (arXiv 2502.20082, section 3.2).

Plain perplexity over long documents is dominated by tokens that need only local context, so it ranks RoPE
factors by their short-range quality. LongRoPE2 instead inserts a "needle" into each long document at a
depth and scores the model only on the needle's answer at the very end (labels -100 elsewhere).

Reproduced from the LongRoPE2 search code (`utils/tokenize_needle_dataset.py`, `evaluation/perplexity.py` of
the LongRoPE2 branch, read in the J-shang/LongRoPE fork): the RULER-style needle ("A special magic number is
hidden within the following text. ..."; "One of the special magic numbers for wandering-age is: N."; the
question "The special magic number for wandering-age mentioned in the provided text is: N"), a random
7-digit N, depths spread evenly over the samples (sample i at (i + u) / n, u uniform), insertion at the
nearest line break, the document cut so the whole sequence is the target length, and the score
exp(mean NLL of the answer tokens). Differs: the reference draws PG19 books; we take consecutive windows of
any text (`--data`: a file, a folder, or the shipped Alice text, repeated when shorter than the target).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from llamalab.errors import LlamalabError

INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n"
)
NEEDLE = "One of the special magic numbers for wandering-age is: {}.\n"
QUESTION = "The special magic number for wandering-age mentioned in the provided text is:"


@dataclass
class NeedleSample:
    ids: list[int]
    answer_start: int  # the answer occupies ids[answer_start:]
    depth: float
    needle: str


def needle_samples(tokenizer, text: str, target_len: int, n: int, seed: int = 0) -> list[NeedleSample]:
    """`n` sequences of exactly `target_len` tokens, each a window of `text` with a needle at depth
    (i + u) / n and the question + answer at the end."""
    if n < 1:
        raise LlamalabError(f"--samples must be at least 1, got {n}")
    rng = random.Random(seed)
    hay = tokenizer.encode(text, add_special_tokens=False)
    if not hay:
        raise LlamalabError("the needle haystack text is empty")
    breaks = {t for t in set(hay) if "\n" in tokenizer.decode([t])}  # tokens that end a line
    head = tokenizer.encode(INTRO)  # with the tokenizer's BOS, as the reference's [bos] + t1
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    samples = []
    for i in range(n):
        needle = str(rng.randint(1_000_000, 9_999_999))
        needle_ids = tokenizer.encode(NEEDLE.format(needle), add_special_tokens=False)
        answer = tokenizer.encode(" " + needle, add_special_tokens=False)
        room = target_len - len(head) - len(needle_ids) - len(question) - len(answer)
        if room < 16:
            raise LlamalabError(f"--target-len {target_len} leaves no room for a document around the needle")
        start = (i * room // 2) % len(hay)  # windows further into the text for each sample
        window = (hay[start:] + hay * (room // len(hay) + 2))[:room]
        depth = (i + rng.random()) / n
        cut = int(depth * room)
        lines = [j + 1 for j, t in enumerate(window) if t in breaks and j + 1 <= room]
        if lines:  # the line break closest to the chosen depth, as the reference inserts
            cut = min(lines, key=lambda j: abs(j - cut))
        ids = head + window[:cut] + needle_ids + window[cut:] + question + answer
        samples.append(NeedleSample(ids, len(ids) - len(answer), cut / room, needle))
    return samples


@torch.inference_mode()
def needle_nll(model, samples: list[NeedleSample]) -> float:
    """Mean negative log-likelihood (nats) of the answer tokens over `samples`, one forward pass each (only
    the answer positions go through the head)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s.ids], device=device)
        hidden = model(ids, hidden=True)[0]  # (T, d)
        pred = hidden[s.answer_start - 1 : len(s.ids) - 1]  # the positions that predict the answer
        logp = torch.log_softmax(model.lm_head(pred).float(), dim=-1)
        targets = ids[0, s.answer_start :]
        total -= float(logp.gather(-1, targets[:, None]).sum())
        count += len(targets)
    return total / count


def needle_ppl(model, samples: list[NeedleSample]) -> float:
    """LongRoPE2's fitness: exp(mean answer-token NLL); lower is better."""
    return math.exp(needle_nll(model, samples))
