"""Passkey retrieval, as evaluated by LongRoPE (arXiv 2402.13753, `evaluation/passkey.py`), which takes it
from Landmark Attention (arXiv 2305.16300, `llama/run_test.py`).

The prompt is, joined with "\\n": the task description; a garbage prefix; "The pass key is K. Remember it.
K is the pass key."; a garbage suffix; "What is the pass key? The pass key is". Garbage is the sentence
block "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated;
prefix and suffix are both cut from its start, their lengths (in characters) a uniform random split of the
garbage budget. K is uniform in [1, 50000]. The model continues greedily for 10 tokens; the first integer
in the continuation is the answer, scored by exact match.

Reproduced: the prompt text, the random draws (one `random.Random(seed)` stream, seed 42, consumed in the
same order as LongRoPE's global `random`, including the draws made while searching for the lengths), the
length search (the garbage budget grows in steps of 128 characters and the last budget below the target is
kept), and the scoring. Differs: LongRoPE's length counts prompt tokens only; ours counts prompt plus the
tokens generated, so that a length equal to the context (8192 for SmolLM2) fits in it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from tqdm import tqdm

from llamalab.errors import LlamalabError
from llamalab.eval.forward import Forward
from llamalab.model_options import check_length

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def garbage_text(n_chars: int) -> str:
    reps = n_chars // (len(GARBAGE) + 1) + 1
    return " ".join([GARBAGE] * reps)[:n_chars]


def generate_prompt(n_garbage: int, rng: random.Random) -> tuple[str, int, float]:
    """(prompt, pass key, depth) for a garbage budget of `n_garbage` characters; depth = prefix share."""
    n_prefix = rng.randint(0, n_garbage)
    n_suffix = n_garbage - n_prefix
    key = rng.randint(1, 50000)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    lines = [TASK, garbage_text(n_prefix), info, garbage_text(n_suffix), QUESTION]
    return "\n".join(lines), key, (n_prefix / n_garbage if n_garbage else 0.0)


def garbage_budgets(
    tokenizer, targets: list[int], rng: random.Random, reserve: int, length_step: int = 128
) -> list[int]:
    """LongRoPE's length search: for each target (ascending), the largest garbage budget (a multiple of
    `length_step`, continuing from the previous target's) whose prompt has fewer than `target - reserve`
    tokens."""
    budgets, last_n = [], 0
    for target in targets:
        goal = target - reserve
        if goal <= 0:
            raise LlamalabError(f"length {target} leaves no room for a prompt after {reserve} new tokens")
        num_tokens, n = 0, last_n
        while num_tokens < goal:
            last_n = n
            n += length_step
            num_tokens = len(tokenizer.encode(generate_prompt(n, rng)[0]))
        budgets.append(last_n)
    return budgets


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@dataclass
class PasskeyResult:
    lengths: list[int]
    accuracy: list[float]  # per length
    trials: int
    prompt_tokens: list[float]  # mean prompt tokens per length
    seconds: float
    tokens_per_s: float
    records: list[dict] = field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "accuracy": {str(n): a for n, a in zip(self.lengths, self.accuracy)},
            "mean_accuracy": sum(self.accuracy) / len(self.accuracy),
            "prompt_tokens": {str(n): t for n, t in zip(self.lengths, self.prompt_tokens)},
            "trials_per_length": self.trials,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
        }


def evaluate_passkey(
    llm,
    lengths: list[int],
    trials: int = 20,
    seed: int = 42,
    max_new_tokens: int = 10,
    fwd: Forward | None = None,
    length_step: int = 128,
    progress: bool | None = None,
    check: bool = True,
) -> PasskeyResult:
    """Passkey accuracy at each total length (prompt + `max_new_tokens` tokens), `trials` prompts each
    (`check=False` lets lengths beyond the context through, for a `fwd` that reduces prompts)."""
    if trials < 1:
        raise LlamalabError(f"--trials must be at least 1, got {trials}")
    lengths = sorted(set(lengths))
    for n in lengths:
        if check:
            check_length(llm, n, f"passkey length {n}")
    fwd = fwd or Forward(llm, scores_need_cache=False)
    rng = random.Random(seed)
    budgets = garbage_budgets(llm.tokenizer, lengths, rng, max_new_tokens, length_step)
    accuracy, mean_tokens, records = [], [], []
    bar = tqdm(
        total=len(lengths) * trials,
        unit="prompt",
        desc="passkey",
        disable=None if progress is None else not progress,
    )
    try:
        for length, budget in zip(lengths, budgets):
            hits, toks = 0, 0
            for t in range(trials):
                prompt, key, depth = generate_prompt(budget, rng)
                ids = llm.encode(prompt)
                out = fwd.greedy(ids, max_new_tokens)
                text = llm.decode(out)
                answer = first_integer(text)
                hits += answer == key
                toks += len(ids)
                records.append(
                    {
                        "length": length,
                        "trial": t,
                        "prompt_tokens": len(ids),
                        "depth": round(depth, 4),
                        "key": key,
                        "answer": answer,
                        "output": text,
                        "correct": answer == key,
                    }
                )
                bar.update(1)
                bar.set_postfix(
                    len=length, acc=f"{hits / (t + 1):.2f}", tok_s=f"{fwd.tokens / fwd.seconds:.0f}"
                )
            accuracy.append(hits / trials)
            mean_tokens.append(toks / trials)
    finally:
        bar.close()
    return PasskeyResult(
        lengths,
        accuracy,
        trials,
        mean_tokens,
        fwd.seconds,
        fwd.tokens / fwd.seconds if fwd.seconds else 0.0,
        records,
    )
