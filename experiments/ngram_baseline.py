"""Count-based baselines for the tiny pretraining run (docs/results/training.md): held-out perplexity of a
unigram and a bigram model estimated on exactly the tokens the run trains on, scored on exactly the tokens
its held-out evaluation predicts.

- Training tokens: the run's `data.train` source tokenized as the loop tokenizes it (the shipped text's
  training part, one document per chapter, each ending with EOS), every token counted once.
- Held-out targets: what `llamalab train` scores every `eval.every` steps, i.e. tokens 1..eval_tokens of
  `data.eval` (the loop predicts each from the tokens before it in its `seq_len` window).
- Unigram: add-lambda (Lidstone) smoothing over the whole vocabulary, p(w) = (c(w) + lambda) / (N + lambda V).
  Reported with lambda = 1 (Laplace) and with the lambda that gives the lowest held-out perplexity (an
  oracle choice, so the baseline is as strong as a unigram can be on this split).
- Bigram: interpolated Kneser-Ney (discount 0.75) over the unigram continuation counts, the Laplace unigram
  below it for unseen words; the first target of each evaluation window is scored by the unigram, as the
  model sees no context there either. A stronger count baseline than the issue asks for, to show what
  context the model learned beyond word frequencies.

    python experiments/ngram_baseline.py runs/pretrain-tiny-s0 [--json docs/results/training/ngram.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np


def tokens_of_run(run_dir: Path) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """(training tokens, held-out targets with their window positions, vocabulary size, config) of a run."""
    import llamalab
    from llamalab.train.config import SourceConfig, TrainConfig, from_dict
    from llamalab.train.data import load_source, resolve_format

    cfg = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()), "config")
    tokenizer = llamalab.load(cfg.tokenizer or cfg.model, dtype="fp32").tokenizer
    train = np.concatenate(
        [load_source(s, resolve_format(s, "clm"), tokenizer, None).tokens for s in cfg.data.train]
    )
    held = load_source(SourceConfig(cfg.data.eval), "text", tokenizer, None).tokens[
        : cfg.data.eval_tokens + 1
    ]
    return train, held, tokenizer.vocab_size, cfg.to_dict()


def unigram_nll(train: np.ndarray, targets: np.ndarray, vocab: int, lam: float) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    p = (counts + lam) / (len(train) + lam * vocab)
    return float(-np.log(p[targets]).mean())


def bigram_kn_nll(train: np.ndarray, held: np.ndarray, seq_len: int, vocab: int, d: float = 0.75) -> float:
    """Mean NLL of held[1:] under interpolated Kneser-Ney, context reset at each `seq_len` window."""
    pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    ctx_total, ctx_types, continuation = Counter(), Counter(), Counter()
    for (a, b), c in pairs.items():
        ctx_total[a] += c
        ctx_types[a] += 1
        continuation[b] += 1
    n_types = len(pairs)
    laplace = (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)
    nll = []
    for i in range(1, len(held)):
        b = int(held[i])
        # Continuation probability, smoothed towards the Laplace unigram for words never seen after anything.
        p_cont = (max(continuation[b] - d, 0) + d * len(continuation) * laplace[b]) / n_types
        a = int(held[i - 1])
        if (i - 1) % seq_len == 0 or ctx_total[a] == 0:  # a window's first target, or an unseen context
            p = laplace[b] if (i - 1) % seq_len == 0 else p_cont
        else:
            p = (max(pairs[(a, b)] - d, 0) + d * ctx_types[a] * p_cont) / ctx_total[a]
        nll.append(-math.log(p))
    return float(np.mean(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a pretraining run directory (its config.json)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    train, held, vocab, cfg = tokens_of_run(args.run)
    targets = held[1:]
    grid = [10.0**e for e in np.arange(-4, 1.01, 0.25)]
    best_nll, best_lam = min((unigram_nll(train, targets, vocab, lam), lam) for lam in grid)
    out = {
        "train_tokens": int(len(train)),
        "heldout_targets": int(len(targets)),
        "vocab": vocab,
        "unigram_laplace_ppl": math.exp(unigram_nll(train, targets, vocab, 1.0)),
        "unigram_best_ppl": math.exp(best_nll),
        "unigram_best_lambda": best_lam,
        "bigram_kn_ppl": math.exp(bigram_kn_nll(train, held, cfg["data"]["seq_len"], vocab)),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
