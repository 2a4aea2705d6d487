"""Passkey retrieval of the default model (SmolLM2-135M-Instruct) up to its 8K context, 20 trials per length.

Runs `llamalab eval passkey` for groups of lengths as parallel processes (each its own seed-42 stream, as
LongRoPE's script would if started once per length group), then merges their JSON reports into one report,
a PNG curve and a markdown table in docs/results/.

    python experiments/passkey_smollm2.py [--groups 1K,2K 4K 8K] [--dtype bf16] [--threads 1]
    python experiments/passkey_smollm2.py --merge-only DIR   # merge passkey_*.json already in DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def run_groups(groups: list[str], dtype: str, threads: int, trials: int, folder: Path) -> None:
    procs = []
    for group in groups:
        out = folder / f"passkey_{group.replace(',', '_')}.json"
        cmd = [sys.executable, "-m", "llamalab.cli", "eval", "passkey", "--lengths", group, "--trials", str(trials),
               "--dtype", dtype, "--threads", str(threads), "--output-json", str(out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd))
    if any(p.wait() for p in procs):
        sys.exit("a passkey run failed")


def merge(folder: Path) -> None:
    from llamalab.eval.report import plot_curve, write_json

    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("passkey_*.json"))]
    if not reports:
        sys.exit(f"no passkey_*.json in {folder}")
    records, seconds = [], 0.0
    for r in reports:  # a length may be split over several runs (other seeds): pool its trials
        records += [{**x, "seed": r["settings"]["seed"]} for x in r["records"]]
        seconds += r["metrics"]["seconds"]
    acc, toks, counts = {}, {}, {}
    for n in sorted({x["length"] for x in records}):
        trials = [x for x in records if x["length"] == n]
        acc[str(n)] = sum(x["correct"] for x in trials) / len(trials)
        toks[str(n)] = sum(x["prompt_tokens"] for x in trials) / len(trials)
        counts[str(n)] = len(trials)
    lengths = sorted(int(n) for n in acc)
    merged = dict(reports[0])
    merged["settings"] = {**reports[0]["settings"], "lengths": lengths,
                          "runs": [r["settings"]["lengths"] for r in reports]}  # fmt: skip
    merged["metrics"] = {
        "accuracy": {str(n): acc[str(n)] for n in lengths},
        "mean_accuracy": sum(acc.values()) / len(acc),
        "prompt_tokens": {str(n): toks[str(n)] for n in lengths},
        "trials_per_length": counts,
        "seconds": seconds,
    }
    merged["records"] = sorted(records, key=lambda x: (x["length"], x["seed"], x["trial"]))
    name = "passkey_smollm2-135m"
    write_json(merged, OUT / f"{name}.json")
    trials = min(counts.values())
    dtype = merged["model_options"]["dtype"]
    plot_curve(lengths, {f"SmolLM2-135M-Instruct ({dtype})": [acc[str(n)] for n in lengths]}, OUT / f"{name}.png",
               f"Passkey retrieval, {trials}+ trials per length", "context length (tokens)", "accuracy")  # fmt: skip
    rows = "\n".join(
        f"| {n} | {toks[str(n)]:.0f} | {acc[str(n)]:.2f} | {round(acc[str(n)] * trials)}/{trials} |"
        for n in lengths
    )
    print(
        "| length (prompt + 10 answer tokens) | mean prompt tokens | accuracy | correct |\n|---|---|---|---|"
    )
    print(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", nargs="+", default=["1K,2K", "4K", "8K"])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--merge-only", type=Path)
    args = p.parse_args()
    if args.merge_only:
        return merge(args.merge_only)
    with tempfile.TemporaryDirectory() as tmp:
        run_groups(args.groups, args.dtype, args.threads, args.trials, Path(tmp))
        merge(Path(tmp))


if __name__ == "__main__":
    main()
