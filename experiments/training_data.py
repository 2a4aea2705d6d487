"""Build the offline instruction and preference sets the training recipes use (recipes/data/).

Everything is generated from the shipped text and small programmatic tasks, so each answer is checkable:

- `instructions.jsonl` / `instructions-heldout.jsonl` (SFT, chat format): arithmetic ("What is 17 + 25?" ->
  "17 + 25 = 42."), reversing a word, choosing the alphabetically first of two words, repeating a phrase from
  the text, and naming the chapter of Alice's Adventures in Wonderland a sentence comes from. The held-out
  set uses other numbers, words and sentences (a disjoint seed and, for text tasks, the held-out part of the
  book), so a gain on it is a skill, not recall.
- `preferences.jsonl` / `preferences-heldout.jsonl` (DPO): on-policy pairs, as DPO is meant to be trained
  (the paper samples both answers from the reference model). The prompt asks what happens in a sentence of
  the text "in one short sentence"; the default model (bf16) samples 8 answers to each (temperature 1.0,
  top-p 0.95, seeded), and a prompt with answers on both sides of a format rule (`follows_format`: one
  sentence of at most 12 words ending with a full stop) gives one pair, a following answer chosen and a
  breaking one rejected, both drawn at random from their side. Both answers are the model's own, so they
  differ in the rule and not in a template the policy could learn to avoid instead. The held-out prompts
  come from the held-out chapters, and are the prompts where the base model can go either way (420 prompts
  gave 286 pairs, 90 held-out prompts 60). Sampling takes ~17 minutes on 2 cores:

    python experiments/training_data.py                 # writes recipes/data/instructions*.jsonl
    python experiments/training_data.py --preferences   # samples recipes/data/preferences*.jsonl
"""

from __future__ import annotations

import argparse
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


def preference_prompts(rng: random.Random, text: str, n: int) -> list[list[dict]]:
    sents = sentences(text)
    prompts = []
    for _ in range(n):
        s = rng.choice(sents)
        subject = rng.choice([w for w in WORDS if w in s.lower()] or ["Alice"])
        prompts.append(
            [{"role": "user", "content": f"In one short sentence, what happens with the {subject} here? {s}"}]
        )
    return prompts


def preference_pairs(
    llm, prompts: list[list[dict]], seed: int, samples: int = 8, batch: int = 64
) -> list[dict]:
    """One pair per prompt whose sampled answers fall on both sides of the rule (see the module docstring)."""
    from tqdm import tqdm

    rng, rows = random.Random(seed), []
    per_batch = max(1, batch // samples)
    for start in tqdm(range(0, len(prompts), per_batch), desc="sampling answers", unit="batch"):
        group = prompts[start : start + per_batch]
        ids = [llm.chat_ids(p) for p in group for _ in range(samples)]
        seqs = llm.generate_sequences(
            ids, max_new_tokens=48, temperature=1.0, top_p=0.95, seed=seed + start * samples
        )
        for j, prompt in enumerate(group):
            answers = [
                s.text.strip() for s in seqs[j * samples : (j + 1) * samples] if s.finish_reason == "stop"
            ]
            good = [a for a in answers if follows_format(a)]
            bad = [a for a in answers if a and not follows_format(a)]
            if good and bad:
                rows.append({"prompt": prompt, "chosen": rng.choice(good), "rejected": rng.choice(bad)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preferences", action="store_true", help="sample the DPO pairs with the default model")
    ap.add_argument(
        "--model", default="smollm2-135m", help="the model that samples the pairs (--preferences)"
    )
    args = ap.parse_args()
    train_text, heldout_text = alice_split()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.preferences:
        import llamalab

        llm = llamalab.load(args.model, dtype="bf16", threads=2)  # 2.2x faster sampling than fp32
        sets = {
            "preferences.jsonl": preference_pairs(llm, preference_prompts(random.Random(2), train_text, 420), seed=2)[:300],
            "preferences-heldout.jsonl": preference_pairs(llm, preference_prompts(random.Random(3), heldout_text, 90), seed=3)[:60],
        }  # fmt: skip
    else:
        sets = {
            "instructions.jsonl": instructions(random.Random(0), train_text, 600),
            "instructions-heldout.jsonl": instructions(random.Random(1), heldout_text, 100),
        }
    for name, rows in sets.items():
        (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {OUT / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
