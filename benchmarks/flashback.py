"""FlashBack (appending retrieved text, arXiv 2405.04065) against In-Context RALM's prepending: time per
generated token over a growing context, the default model, greedy, a retrieval every `--stride` tokens.

The context is a stretch of the shipped Alice text; the retriever is BM25 (bm25s) over 300-word chunks of the
rest of the book with the last 32 tokens as the query; each retrieved chunk is cut to `--doc-tokens`. Both
modes run the same retrievals on the same engine (prefix reuse on); appending keeps the context's KV cache,
prepending recomputes it at every retrieval. Modes alternate within each round and the best round counts.

    python benchmarks/flashback.py --contexts 512,1024,2048,4096 --new-tokens 64 --stride 16 --threads 2
    python benchmarks/flashback.py --contexts 512,2048,7680 --new-tokens 32 --stride 8 --new-docs
"""

from __future__ import annotations

import argparse
import json
import platform

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="512,1024,2048,4096")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--doc-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--new-docs",
        action="store_true",
        help="Each retrieval takes the best document not yet used in this generation, so the document always "
        "changes (the case prepending must recompute; with BM25's plain choice the same one often repeats).",
    )
    p.add_argument("--out", help="Append each result as one JSON line here.")
    args = p.parse_args()

    from llamalab.data import sample_text
    from llamalab.longctx.flashback import RetrievalLM
    from llamalab.longctx.rag import BM25Retriever, chunk_words
    from llamalab.model_options import ModelOptions, load_model

    llm = load_model(ModelOptions(dtype=args.dtype, threads=args.threads))
    text = sample_text()
    book = llm.encode(text)
    retriever = BM25Retriever(chunk_words(text[len(text) // 2 :], 300))  # documents: the book's second half
    chunk_ids = [llm.encode(c.text, add_special_tokens=False)[: args.doc_tokens] for c in retriever.chunks]

    used: set[int] = set()  # documents retrieved in the current generation (--new-docs)

    def retrieve(query_ids: list[int]) -> list[int]:
        scores = retriever.scores(llm.decode(query_ids))
        if args.new_docs:
            scores[list(used)] = -float("inf")
        best = int(scores.argmax())
        used.add(best)
        return chunk_ids[best]

    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        context = book[:n]
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for mode in ("prepend", "append"):
                used.clear()
                max_len = n + args.new_tokens + args.doc_tokens + 64
                r = RetrievalLM(llm, retrieve, mode, args.stride, max_len=max_len).generate(
                    context, args.new_tokens
                )
                row = {"context": n, "mode": mode, "ms_per_token": round(r.ms_per_token, 1),
                       "retrievals": r.retrievals, "prefilled": r.prefilled, "reused": r.reused,
                       "tokens": r.tokens, "documents": len(used), "new_docs": args.new_docs}  # fmt: skip
                if mode not in best or row["ms_per_token"] < best[mode]["ms_per_token"]:
                    best[mode] = row
        same = best["append"]["tokens"] == best["prepend"]["tokens"]
        for mode in ("prepend", "append"):
            row = {k: v for k, v in best[mode].items() if k != "tokens"}
            row.update(dtype=args.dtype, threads=args.threads, new_tokens=args.new_tokens, stride=args.stride,
                       doc_tokens=args.doc_tokens, same_tokens_as_other_mode=same,
                       torch=torch.__version__, machine=platform.machine())  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        speedup = best["prepend"]["ms_per_token"] / best["append"]["ms_per_token"]
        print(f"context {n}: append {speedup:.2f}x faster per token than prepend", flush=True)


if __name__ == "__main__":
    main()
