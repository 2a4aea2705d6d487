"""Decode and prefill speed of two llamalab checkouts in the same run (e.g. before and after a refactor).

Each round runs `llamalab bench --json` once per tree and setting, in turn, as a subprocess with the tree's
`src/` first on PYTHONPATH, so a busy phase of the machine hits both trees alike; the table gives the median
over rounds and the ratio of the second tree to the first.

    python benchmarks/before_after.py --tree OLD_CHECKOUT --tree . [--threads 2] [--rounds 5]
        [--setting "bf16 1" --setting "fp32 1" --setting "bf16 8"]   # dtype and batch

Prints a markdown table and replaces the `before-after` section of BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from sections import write_section


def bench(tree: Path, dtype: str, batch: int, args) -> dict:
    cmd = [sys.executable, "-m", "llamalab.cli", "bench", "--model", "smollm2-135m", "--dtype", dtype,
           "--threads", str(args.threads), "--batch", str(batch), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", "2", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, action="append", required=True)
    ap.add_argument("--setting", action="append", help='"DTYPE BATCH" (default: bf16 1, fp32 1, bf16 8)')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    trees = [t.resolve() for t in args.tree]
    settings = [(s.split()[0], int(s.split()[1])) for s in args.setting or ["bf16 1", "fp32 1", "bf16 8"]]
    runs: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for dtype, batch in settings:
            for tree in trees:
                result = bench(tree, dtype, batch, args)
                runs.setdefault((dtype, batch, tree), []).append(result)
                print(f"round {r + 1}: {tree.name} {dtype} batch {batch}: decode "
                      f"{result['decode_tokens_per_s']:.1f} tok/s, prefill {result['prefill_tokens_per_s']:.0f}",
                      file=sys.stderr)  # fmt: skip
    rows = []
    for dtype, batch in settings:
        med = {}
        for tree in trees:
            results = runs[(dtype, batch, tree)]
            med[tree] = tuple(statistics.median(x[k] for x in results)
                              for k in ("decode_tokens_per_s", "prefill_tokens_per_s"))  # fmt: skip
            spread = [x["decode_tokens_per_s"] for x in results]
            rows.append(f"| {dtype} | {batch} | {tree.name} | {med[tree][0]:.1f} ({min(spread):.1f}-{max(spread):.1f}) "
                        f"| {med[tree][1]:.0f} | {med[tree][0] / med[trees[0]][0]:.3f}x | "
                        f"{med[tree][1] / med[trees[0]][1]:.3f}x |")  # fmt: skip
    table = (
        f"Machine: {platform.machine()}, {args.threads} threads, SmolLM2-135M, prompt {args.prompt_tokens} + "
        f"{args.new_tokens} new tokens, median (min-max) of {args.rounds} interleaved rounds, each the best of "
        "2 repeats (`llamalab bench`).\n\n"
        "| dtype | batch | tree | decode tok/s | prefill tok/s | decode vs first | prefill vs first |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    if not args.no_write:
        write_section("before-after", "\n" + table + "\n")


if __name__ == "__main__":
    main()
