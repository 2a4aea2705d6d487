"""How much of the longrope-against-yarn gap in the long-context study is the attention factor: needle
perplexity (the LongRoPE search's fitness, its 2 documents of seed 0 at 16K) of yarn and of the LongRoPE2
search's best factors, each with its own attention factor and with the other's.

    python experiments/longrope_attention_check.py > docs/results/longctx/longrope_attention_check.log
"""

import json
import math
import sys
from pathlib import Path

from llamalab.data import sample_text
from llamalab.longctx.cli import set_scaling
from llamalab.longctx.needle_ppl import needle_ppl, needle_samples
from llamalab.model_options import ModelOptions, load_model

llm = load_model(ModelOptions(dtype="bf16", threads=2))
docs = needle_samples(llm.tokenizer, sample_text(), 16384, 2, 0)
results = Path(__file__).resolve().parents[1] / "docs" / "results"
best = json.loads((results / "longrope2_smollm2_16k.json").read_text())["rope_scaling"]
yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
cases = {
    "yarn": yarn,
    "yarn attn 1.0": {**yarn, "attention_factor": 1.0},
    "best (attn default 1.038)": best,
    "best attn 1.069": {**best, "attention_factor": 0.1 * math.log(2) + 1},
    "best attn 1.0": {**best, "attention_factor": 1.0},
}
for name in sys.argv[1:] or cases:
    set_scaling(llm, cases[name], 16384)
    print(f"{name}: {needle_ppl(llm.model, docs):.4f}", flush=True)
