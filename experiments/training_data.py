"""Build the offline instruction and preference sets the training recipes use (recipes/data/).

Everything is generated from the shipped text and small programmatic tasks, so each answer is checkable:

- `instructions.jsonl` / `instructions-heldout.jsonl` (SFT, chat format): arithmetic ("What is 17 + 25?" ->
  "17 + 25 = 42."), reversing a word, choosing the alphabetically first of two words, repeating a phrase from
  the text, and naming the chapter of Alice's Adventures in Wonderland a sentence comes from. The held-out
  set uses other numbers, words and sentences (a disjoint seed and, for text tasks, the held-out part of the
  book), so a gain on it is a skill, not recall.
- `preferences.jsonl` / `preferences-heldout.jsonl` (DPO): questions about the text, where the chosen answer
  follows a format rule (one sentence, at most 12 words, ending with a full stop) and the rejected one breaks
  it (a rambling multi-sentence answer). The rule is checked by `follows_format` on held-out prompts.

    python experiments/training_data.py            # writes recipes/data/*.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llamalab.data import alice_split, chapters

OUT = Path(__file__).resolve().parents[1] / "recipes" / "data"
WORDS = ["rabbit", "queen", "hatter", "garden", "caterpillar", "mushroom", "tea", "croquet", "turtle", "gryphon",
         "duchess", "pepper", "dormouse", "key", "door", "bottle", "cake", "fan", "gloves", "cat", "pig", "baby",
         "lobster", "soup", "trial", "jury", "king", "knave", "tart", "rose", "card", "flamingo"]  # fmt: skip


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if 6 <= len(s.split()) <= 18 and '"' not in s]


def follows_format(answer: str) -> bool:
    """The preference rule: one sentence of at most 12 words ending with a full stop."""
    a = answer.strip()
    return a.endswith(".") and len(a.split()) <= 12 and len(re.findall(r"[.!?]", a)) == 1


def instructions(rng: random.Random, text: str, n: int) -> list[dict]:
    sents = sentences(text)
    docs = chapters(text)
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            q, ans = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif kind == 1:
            w = rng.choice(WORDS)
            q, ans = f"Write the word '{w}' backwards.", w[::-1]
        elif kind == 2:
            a, b = rng.sample(WORDS, 2)
            q, ans = f"Which word comes first in alphabetical order: {a} or {b}?", f"{min(a, b)}."
        elif kind == 3:
            s = rng.choice(sents)
            q, ans = f"Repeat this sentence exactly: {s}", s
        else:
            k = rng.randrange(len(docs))
            s = rng.choice(sentences(docs[k]) or sents)
            heading = docs[k].strip().splitlines()[0].strip()
            q, ans = f"Which chapter heading comes before this sentence? {s}", heading
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    return rows


def preferences(rng: random.Random, text: str, n: int) -> list[dict]:
    sents = sentences(text)
    rows = []
    for _ in range(n):
        s = rng.choice(sents)
        subject = rng.choice([w for w in WORDS if w in s.lower()] or ["Alice"])
        short = " ".join(re.sub(r"[.!?;:,]", "", w) for w in s.split()[:10]).strip() + "."
        long = f"Well, that is a long story. {s} And then, of course, there is much more to say about the {subject}!"
        rows.append({
            "prompt": [{"role": "user", "content": f"In one short sentence, what happens with the {subject} here? {s}"}],
            "chosen": short,
            "rejected": long,
        })  # fmt: skip
        assert follows_format(short) and not follows_format(long)
    return rows


def main() -> None:
    train_text, heldout_text = alice_split()
    OUT.mkdir(parents=True, exist_ok=True)
    sets = {
        "instructions.jsonl": instructions(random.Random(0), train_text, 600),
        "instructions-heldout.jsonl": instructions(random.Random(1), heldout_text, 100),
        "preferences.jsonl": preferences(random.Random(2), train_text, 300),
        "preferences-heldout.jsonl": preferences(random.Random(3), heldout_text, 60),
    }
    for name, rows in sets.items():
        (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {OUT / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
