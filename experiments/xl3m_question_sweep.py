"""Where XL3M ranks the key's segment, by question length and scorer, on 16K-token passkey prompts of another
seed (7) than the long-context study's (42), so the study's prompts are not used to pick the default.

    python experiments/xl3m_question_sweep.py > docs/results/longctx/xl3m_question_sweep.log

Rank 0 = the segment XL3M finds most relevant (of 32 segments of 512 tokens); "key kept" = the key is in the
2048-token key context XL3M builds.
"""

import random
import statistics

from llamalab.eval.passkey import garbage_budgets, generate_prompt
from llamalab.longctx.xl3m import XL3MConfig, select
from llamalab.model_options import ModelOptions, load_model

llm = load_model(ModelOptions(dtype="bf16", threads=1))
rng = random.Random(7)
(budget,) = garbage_budgets(llm.tokenizer, [16384], rng, 10)
prompts = [generate_prompt(budget, rng) for _ in range(8)]
for q in (8, 16, 32):
    for scorer in ("entropy", "nll"):
        ranks, kept = [], 0
        for text, key, _depth in prompts:
            ids = llm.encode(text)
            sel = select(llm.model, ids, XL3MConfig(512, q, 2048, scorer), 10)
            body = ids[:-q]
            holder = next(
                i for i in range(len(sel.scores)) if str(key) in llm.decode(body[i * 512 : (i + 1) * 512])
            )
            ranked = sorted(range(len(sel.scores)), key=lambda i: sel.scores[i])
            ranks.append(ranked.index(holder))
            kept += str(key) in llm.decode(sel.ids)
        print(
            f"question {q:2d} {scorer:7s}: key segment ranks {sorted(ranks)} "
            f"(median {statistics.median(ranks)}), key kept {kept}/8",
            flush=True,
        )
