"""How long a running stream waits while a long prompt joins the serving batch: the longest gap between its
tokens, against its gap with nobody joining, for one or more source trees in the same run.

A server (`llamalab serve`, the embedded SmolLM2-135M) streams one completion A (greedy, EOS banned, so it
runs its full length). After A's 30th token a second client sends B, a prompt of `--prompt-tokens` tokens
of real text asking for one token. Reported per tree: A's median gap between tokens before B arrives, A's
longest gap while B is prefilled, and B's time to its token. Before chunked prefill the engine prefilled B
whole between two of A's steps, so A's longest gap was B's whole prefill; with it, A waits one chunk
(`--prefill-chunk` tokens) per step.

    python benchmarks/prefill_gap.py [--threads 2] [--dtype bf16] [--prompt-tokens 4000] [--rounds 3]
        [--tree DIR ...]   # each DIR a llamalab checkout; its src/ is put first on PYTHONPATH

Trees run in turn within each round (interleaved, so a busy phase of the machine hits both); each figure is
the median over rounds. Prints a markdown table and replaces the `prefill-gap` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from sections import write_section
from serve import BANNED, Server, free_port

ROOT = Path(__file__).resolve().parents[1]


def long_prompt(n_tokens: int) -> str:
    """About `n_tokens` tokens of the shipped text (SmolLM2's tokenizer: ~4.3 characters a token)."""
    from llamalab.data import sample_text

    text = sample_text()
    return text[: int(n_tokens * 4.3)]


def measure(url: str, prompt: str, new_tokens: int) -> dict[str, float]:
    """Stream A; send B after A's 30th token; return A's gaps and B's latency (seconds)."""
    arrivals: list[float] = []
    b_sent, b_done = [0.0], [0.0]

    def send_b() -> None:
        b_sent[0] = time.perf_counter()
        body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 1, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        b_done[0] = time.perf_counter()

    body = {
        "model": "smollm2-135m",
        "prompt": "Once upon a time",
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": BANNED,
    }
    sender = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if json.loads(line[5:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if len(arrivals) == 30 and sender is None:
                sender = threading.Thread(target=send_b)
                sender.start()
    sender.join()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    before = [g for g, t in zip(gaps, arrivals[1:]) if t < b_sent[0]]
    during = [g for g, t in zip(gaps, arrivals[1:]) if b_sent[0] < t <= b_done[0] + max(before)]
    return {"idle_gap": statistics.median(before), "max_gap": max(during), "b_latency": b_done[0] - b_sent[0]}


def start(tree: Path, args) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llamalab.cli", "serve", "--model", "smollm2-135m", "--port", str(port),
           "--threads", str(args.threads), "--dtype", args.dtype, "--max-batch", "2"]  # fmt: skip
    server = Server(f"tree-{tree.name}", cmd, f"http://127.0.0.1:{port}", "smollm2-135m",
                    env={"PYTHONPATH": str(tree / "src")})  # fmt: skip
    server.wait("/health")
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--new-tokens", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", type=Path, action="append", help="a llamalab checkout (default: this one)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    prompt = long_prompt(args.prompt_tokens)
    runs: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            server = start(tree, args)
            try:
                measure(server.url, prompt[:2000], 40)  # warm-up: kernels, allocator
                runs[tree].append(measure(server.url, prompt, args.new_tokens))
            finally:
                server.stop()
    rows = []
    for tree, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        rows.append(
            f"| {tree.name} | {med['idle_gap'] * 1e3:.0f} | {med['max_gap'] * 1e3:.0f} | "
            f"{med['max_gap'] / med['idle_gap']:.1f}x | {med['b_latency']:.2f} |"
        )
    table = (
        f"Machine: {platform.machine()}, {args.threads} threads, {args.dtype}, SmolLM2-135M, batch slots 2, "
        f"joining prompt ~{args.prompt_tokens} tokens, medians of {args.rounds} interleaved rounds.\n\n"
        "| tree | A's gap, idle (ms) | A's longest gap while B joins (ms) | ratio | B's latency (s) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    if not args.no_write:
        write_section("prefill-gap", "\n" + table + "\n")


if __name__ == "__main__":
    main()
