"""Serving capacity under a fixed KV-cache budget (issue 12): how many concurrent 4K-token sequences each
KV-cache method fits in `--budget-mb` of cache memory, against the dense cache, and the aggregate decode
tokens/s of that many sequences decoding together.

Per method, in one process each: the bytes of one sequence are measured from a one-row cache filled with
`--context` tokens of real text (every scale, window, sink and retained token held; AQUA-KV's predictors are
shared by all sequences and counted once, against the budget). The capacity is the budget over that. Then
the engine `llamalab serve` runs (continuous batching) is made with that many rows of `--context` positions:
its cache's measured bytes must fit the budget; every row gets a prompt of context - new tokens (each from
its own offset in the book), all are prefilled, then all decode `--new-tokens` together: aggregate tokens/s
= rows x new tokens / decode time.

    python benchmarks/kv_capacity.py [--budget-mb 256] [--context 4096] [--new-tokens 32] [--threads 2]
                                     [--predictors FILE] [--no-write]

Prints a markdown table and replaces the `kv_capacity` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import kv_decode
from kv_decode import fit_predictors, in_subprocess
from sections import write_section

# kv_decode's methods, less HIGGS (AQUA-KV's bytes without its predictors) and MiniCache alone (larger than
# dense on this model)
METHODS = {k: kv_decode.METHODS[k] for k in ("dense", "KIVI-4", "KIVI-2", "AQUA-KV 2", "MiniCache + KIVI-4")}


def measure(method: str, bits: float | None, predictors: str | None, budget: float, context: int, new: int,
            threads: int) -> dict:  # fmt: skip
    import torch

    import llamalab
    from llamalab.bench import bench_tokens, prefill_then_decode
    from llamalab.generate.sampling import SamplingParams
    from llamalab.kv.registry import CacheSpec

    torch.set_num_threads(threads)
    spec = CacheSpec(method, bits, predictors=predictors if method == "aquakv" else None)
    llm = llamalab.load("smollm2-135m", dtype="bf16", kv=spec)
    book = bench_tokens(llm, 64 * context)  # the book, repeated as needed: a distinct prompt for every row
    one = spec.make(llm.model.config, context, 1, llm.dtype, "cpu")
    ids = torch.tensor([book[:context]])
    with torch.inference_mode():
        for s in range(0, context, 512):
            llm.model(ids[:, s : s + 512], s, one, [0])
    shared = int(one.predictor_bytes()) if hasattr(one, "predictor_bytes") else 0
    per_row = int(one.nbytes())
    rows = int((budget - shared) // per_row)
    del one
    if rows < 1:
        return {"per_row_mb": per_row / 1e6, "shared_mb": shared / 1e6, "rows": 0}
    engine = llm.engine(max_batch=rows, max_len=context)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    starts = [(r * 997) % (len(book) - context) for r in range(rows)]
    with torch.inference_mode():
        prefill_s, decode_s, steps = prefill_then_decode(
            engine, [book[s : s + context - new] for s in starts], params
        )
    held = int(engine.cache.nbytes()) + shared
    return {
        "per_row_mb": per_row / 1e6,
        "shared_mb": shared / 1e6,
        "rows": rows,
        "cache_mb": held / 1e6,
        "fits": held <= budget,
        "prefill_tokens_per_s": rows * (context - new) / prefill_s,
        "decode_tokens_per_s": rows * new / decode_s,
        "decode_steps": steps,
        "decode_path": engine.decode_path,
    }


def table(rows: dict, budget_mb: float, context: int, new: int, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    dense = rows["dense"]
    lines = [
        f"SmolLM2-135M-Instruct, bf16, a KV-cache budget of {budget_mb:g} MB, sequences of {context} tokens "
        f"({context - new} of prompt, {new} decoded together), {threads} threads ({cpu}, {os.cpu_count()} CPUs). "
        "Per sequence: measured from a cache filled with that many tokens. Rows: how many sequences the budget "
        "holds (the engine's cache for them, measured, is the cache MB column; AQUA-KV's predictors, shared, "
        "are inside it). Aggregate: decode tokens/s of all rows together, and over the dense cache's.",
        "",
        "| KV cache | MB a sequence | sequences in budget (x dense) | cache MB held | decode path | aggregate tok/s "
        "(x dense) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, r in rows.items():
        if not r["rows"]:
            lines.append(f"| {label} | {r['per_row_mb']:.1f} | 0 | - | - | - |")
            continue
        lines.append(
            f"| {label} | {r['per_row_mb']:.1f} | {r['rows']} ({r['rows'] / dense['rows']:.1f}) | "
            f"{r['cache_mb']:.1f} | {r['decode_path'].split(' ')[0]} | {r['decode_tokens_per_s']:.1f} "
            f"({r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-mb", type=float, default=256)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--predictors", help="AQUA-KV predictors (llamalab kv calibrate); default: fit them first"
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        method, bits = a.one
        r = measure(method, None if bits == "-" else float(bits), a.predictors, a.budget_mb * 1e6, a.context,
                    a.new_tokens, a.threads)  # fmt: skip
        print(json.dumps(r))
        return
    labels = [m.strip() for m in a.methods.split(",")]
    common = ["--budget-mb", str(a.budget_mb), "--context", str(a.context), "--new-tokens", str(a.new_tokens),
              "--threads", str(a.threads)]  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        predictors = a.predictors
        if predictors is None and any(METHODS[m][0] == "aquakv" for m in labels):
            print("fitting AQUA-KV's predictors (2 bits) ...", file=sys.stderr)
            predictors = str(fit_predictors(Path(tmp) / "aquakv.pt", a.threads))
        for label in labels:
            method, bits = METHODS[label]
            extra = ["--predictors", predictors] if method == "aquakv" else []
            rows[label] = in_subprocess(
                ["--one", method, "-" if bits is None else str(bits), *common, *extra], script=__file__
            )
            print(f"{label}: {rows[label]}", file=sys.stderr)
    body = table(rows, a.budget_mb, a.context, a.new_tokens, a.threads)
    print(body)
    if not a.no_write:
        write_section("kv_capacity", body)


if __name__ == "__main__":
    main()
