"""Context extension of the default model (SmolLM2-135M-Instruct, trained to 8K): passkey beyond the trained
length with each RoPE scaling, short-context retention, and the papers' claims beside ours.

    python experiments/longctx_study.py retention [--windows 4]        # perplexity at 2K, every method
    python experiments/longctx_study.py passkey --lengths 16K --trials 10   # resumable: rerun to continue
    python experiments/longctx_study.py reduced --lengths 16K --trials 10  # XL3M / RAG / truncation, unscaled
    python experiments/longctx_study.py heldout                         # searched factors on unseen needles
    python experiments/longctx_study.py report                          # docs/results/longctx_study.md + png

Methods, at s = length / 8K (2 at 16K, 4 at 32K): `none` (plain RoPE run past its trained length:
extrapolation), `linear` (PI), `dynamic` (NTK), `yarn`, and the factors `llamalab longrope search` found for 16K:
`longrope2` (LongRoPE2's space, docs/results/longrope2_smollm2_16k.json) and `longrope-v1` (LongRoPE's space
from YaRN's start, docs/results/longrope_v1_smollm2_16k.json). Every record is one trial appended to a
JSONL file under docs/results/longctx/, so an interrupted run continues where it stopped (a trial is never run
twice). Trials of one length use the same prompts for every method (LongRoPE's prompt, one
`random.Random(seed)` stream) and run round-robin over the methods, so a partial run has the same trials for
each; within a method the prompts go in order of decreasing key depth, so each reuses the previous one's KV
cache up to its key (the engine's prefix reuse), which halves the prefill on average without changing any
answer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from longctx_report import read, write_report  # beside this script: its tables and the records' reader

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
RECORDS = OUT / "longctx"
SEARCHED = {
    "longrope2": OUT / "longrope2_smollm2_16k.json",
    "longrope-v1": OUT / "longrope_v1_smollm2_16k.json",
}
TRAINED = 8192  # the default model's max_position_embeddings: each scaling is set for factor length / 8K
METHODS = ["none", "linear", "dynamic", "yarn", *SEARCHED]
REDUCERS = "xl3m,xl3m-q32,rag-bm25,rag-dense,truncation"


def options(method: str, context: int, dtype: str, threads: int):
    from llamalab.model_options import ModelOptions

    base = dict(dtype=dtype, threads=threads)
    if method == "none":
        return ModelOptions(**base)
    if method in SEARCHED:
        path = SEARCHED[method]
        if context != json.loads(path.read_text())["longrope_search"]["settings"]["target_len"]:
            sys.exit(f"{path} holds factors searched for another length than {context}")
        return ModelOptions(**base, rope_config=str(path), context=context)
    return ModelOptions(**base, rope_scaling=method, rope_factor=context / TRAINED, context=context)


def load(method: str, context: int, dtype: str, threads: int):
    from llamalab.model_options import load_model

    llm = load_model(options(method, context, dtype, threads))
    if method == "none":  # plain RoPE past its trained length: let the context through, nothing else
        llm.model.config.max_position_embeddings = context
    return llm


def done_keys(path: Path) -> set[tuple]:
    return {(r["method"], r["length"], r["trial"]) for r in read(path)}


def passkey(args) -> None:
    from llamalab.eval.cli import parse_lengths
    from llamalab.eval.forward import Forward
    from llamalab.eval.passkey import first_integer, garbage_budgets, generate_prompt
    from llamalab.model_options import ModelOptions

    methods = args.methods.split(",")
    for method in set(methods) & set(SEARCHED):
        if not SEARCHED[method].exists():
            sys.exit(
                f"{SEARCHED[method]} is missing: run `llamalab longrope search` first (see the study's page)"
            )
    path = RECORDS / "passkey.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(path)
    for length in parse_lengths(args.lengths):
        models, fwds = {}, {}
        first = load(methods[0], length, args.dtype, args.threads)
        rng = random.Random(args.seed)  # LongRoPE's stream: the length search, then the prompts
        (budget,) = garbage_budgets(first.tokenizer, [length], rng, 10)
        prompts = [generate_prompt(budget, rng) for _ in range(args.trials)]
        order = sorted(range(args.trials), key=lambda t: -prompts[t][2])  # deepest key first: prefix reuse
        for t in order:
            for method in methods:
                if (method, length, t) in done:
                    continue
                if method not in models:
                    models[method] = (
                        first if method == methods[0] else load(method, length, args.dtype, args.threads)
                    )
                    fwds[method] = Forward(models[method], ModelOptions(), scores_need_cache=False)
                llm, fwd = models[method], fwds[method]
                text, key, depth = prompts[t]
                ids = llm.encode(text)
                t0 = time.perf_counter()
                out = llm.decode(fwd.greedy(ids, 10))
                answer = first_integer(out)
                rec = {"method": method, "length": length, "trial": t, "depth": round(depth, 4), "key": key,
                       "answer": answer, "correct": answer == key, "output": out, "prompt_tokens": len(ids),
                       "seconds": round(time.perf_counter() - t0, 1), "dtype": args.dtype, "seed": args.seed,
                       "rope_scaling": llm.model.config.rope_scaling}  # fmt: skip
                with path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{method:>9} {length} trial {t} depth {depth:.2f}: {answer} vs {key} "
                      f"({rec['seconds']} s)", flush=True)  # fmt: skip


def truncate_middle(budget: int):
    """LongBench's truncation: keep the first and last budget/2 tokens of a prompt that is too long."""

    def reduce(ids: list[int], max_new_tokens: int) -> list[int]:
        keep = budget - max_new_tokens
        return ids if len(ids) <= keep else ids[: keep // 2] + ids[len(ids) - (keep - keep // 2) :]

    return reduce


class KeptPrompt:
    """A reducer that remembers what it kept, so that a miss can be told apart: the key lost by the reduction,
    or kept and not read."""

    def __init__(self, reduce) -> None:
        self.reduce, self.original, self.ids = reduce, [], []

    def __call__(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self.original, self.ids = ids, self.reduce(ids, max_new_tokens)
        return self.ids

    def evidence(self, llm, key: int) -> dict:
        out = {"reduced_tokens": len(self.ids), "key_kept": str(key) in llm.decode(self.ids)}
        sel = getattr(self.reduce, "last", None)
        # XL3M: the rank of the key's segment by certainty (0 = most certain)
        if getattr(sel, "scores", None):
            texts = [llm.decode(self.original[a:b]) for a, b in sel.bounds]
            holder = next((i for i, text in enumerate(texts) if str(key) in text), None)
            ranked = sorted(range(len(sel.scores)), key=lambda i: sel.scores[i])
            out.update(
                segments=len(sel.scores), key_segment_rank=None if holder is None else ranked.index(holder)
            )
        return out


def reduced(args) -> None:
    """Passkey beyond the context with the unscaled model: XL3M, retrieval (BM25, dense) and truncation, all
    reading at most `--budget` tokens."""
    from llamalab.eval.cli import parse_lengths
    from llamalab.eval.forward import Forward
    from llamalab.eval.passkey import first_integer, garbage_budgets, generate_prompt
    from llamalab.longctx.rag import RAGReducer
    from llamalab.longctx.xl3m import XL3MConfig, XL3MReducer
    from llamalab.model_options import ModelOptions, load_model

    path = RECORDS / "reduced.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(path)
    llm = load_model(ModelOptions(dtype=args.dtype, threads=args.threads))
    top_k = max(1, args.budget // 450)  # ~400 tokens per 300-word chunk: top-k to fill the budget
    reducers = {
        "truncation": truncate_middle(args.budget),
        "xl3m": XL3MReducer(llm, XL3MConfig(segment_len=512, key_len=args.budget)),  # an 8-token question
        "xl3m-q32": XL3MReducer(llm, XL3MConfig(segment_len=512, question_len=32, key_len=args.budget)),
        "rag-bm25": RAGReducer(llm, "bm25", top_k, 300, "document", 32),
        "rag-dense": RAGReducer(llm, "dense", top_k, 300, "document", 32),
    }
    methods = args.methods.split(",")
    kept = {m: KeptPrompt(reducers[m]) for m in methods}
    fwds = {m: Forward(llm, ModelOptions(), scores_need_cache=False, reduce=kept[m]) for m in methods}
    for length in parse_lengths(args.lengths):
        rng = random.Random(args.seed)
        (budget_chars,) = garbage_budgets(llm.tokenizer, [length], rng, 10)
        prompts = [generate_prompt(budget_chars, rng) for _ in range(args.trials)]
        for t in range(args.trials):
            for method in methods:
                if (method, length, t) in done:
                    continue
                text, key, depth = prompts[t]
                ids = llm.encode(text)
                t0 = time.perf_counter()
                out = llm.decode(fwds[method].greedy(ids, 10))
                answer = first_integer(out)
                rec = {"method": method, "length": length, "trial": t, "depth": round(depth, 4), "key": key,
                       "answer": answer, "correct": answer == key, "output": out, "prompt_tokens": len(ids),
                       "budget": args.budget, "seconds": round(time.perf_counter() - t0, 1), "dtype": args.dtype,
                       "seed": args.seed, "top_k": top_k if method.startswith("rag") else None,
                       **kept[method].evidence(llm, key)}  # fmt: skip
                with path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{method:>10} {length} trial {t} depth {depth:.2f}: {answer} vs {key} ({rec['seconds']} s)",
                      flush=True)  # fmt: skip


def retention(args) -> None:
    from llamalab.data import sample_text
    from llamalab.eval.perplexity import perplexity

    path = RECORDS / "retention.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["method"] for r in read(path)}
    text = sample_text()
    heldout = text[int(len(text) * 0.75) :]  # the quantization study's held-out quarter
    for method in args.methods.split(","):
        if method in done:
            continue
        llm = load(method, 16384, args.dtype, args.threads)
        r = perplexity(llm, llm.encode(heldout), args.seq_len, max_windows=args.windows, progress=False)
        rec = {"method": method, "seq_len": args.seq_len, "windows": r.windows, "tokens": r.tokens, "ppl": r.ppl,
               "window_nll": r.window_nll, "dtype": args.dtype, "rope_scaling": llm.model.config.rope_scaling}  # fmt: skip
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{method:>9}: ppl {r.ppl:.3f} at {args.seq_len} ({r.windows} windows)", flush=True)


def heldout(args) -> None:
    """Each search's best factors and plain yarn on needle documents the search did not score (another seed),
    so a fitness that only fits its own documents shows."""
    from llamalab.data import sample_text
    from llamalab.longctx.needle_ppl import needle_ppl, needle_samples

    path = RECORDS / "search_heldout.jsonl"
    done = {r["method"] for r in read(path)}
    yarn = load("yarn", 16384, args.dtype, args.threads)
    docs = needle_samples(yarn.tokenizer, sample_text(), 16384, args.samples, args.seed)
    for method in ["yarn", *SEARCHED]:
        if method in done or not (method == "yarn" or SEARCHED[method].exists()):
            continue
        llm = yarn if method == "yarn" else load(method, 16384, args.dtype, args.threads)
        rec = {"method": method, "needle_ppl": needle_ppl(llm.model, docs), "samples": args.samples,
               "seed": args.seed, "dtype": args.dtype, "rope_scaling": llm.model.config.rope_scaling}  # fmt: skip
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"{method:>12}: needle ppl {rec['needle_ppl']:.4f} on {args.samples} documents of seed {args.seed}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("passkey", "retention", "reduced"):
        s = sub.add_parser(name)
        s.add_argument("--methods", default=",".join(METHODS) if name != "reduced" else REDUCERS)
        s.add_argument("--dtype", default="bf16")
        s.add_argument("--threads", type=int, default=2)
    sub.choices["passkey"].add_argument("--lengths", default="16K")
    sub.choices["passkey"].add_argument("--trials", type=int, default=10)
    sub.choices["passkey"].add_argument("--seed", type=int, default=42)
    sub.choices["reduced"].add_argument("--lengths", default="16K")
    sub.choices["reduced"].add_argument("--trials", type=int, default=10)
    sub.choices["reduced"].add_argument("--seed", type=int, default=42)
    sub.choices["reduced"].add_argument("--budget", type=int, default=2048)
    sub.choices["retention"].add_argument("--seq-len", type=int, default=2048)
    sub.choices["retention"].add_argument("--windows", type=int, default=4)
    h = sub.add_parser("heldout")
    h.add_argument("--samples", type=int, default=2)
    h.add_argument("--seed", type=int, default=1)  # the searches scored seed 0's documents
    h.add_argument("--dtype", default="bf16")
    h.add_argument("--threads", type=int, default=2)
    sub.add_parser("report")
    args = p.parse_args()
    if args.cmd == "report":
        write_report(RECORDS, OUT, SEARCHED)
    else:
        {"passkey": passkey, "retention": retention, "reduced": reduced, "heldout": heldout}[args.cmd](args)


if __name__ == "__main__":
    main()
