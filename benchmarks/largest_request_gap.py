"""How much a running stream slows while another client sends the largest request the server accepts: the
gaps between its tokens under each kind of load, against its gaps alone, for one or more source trees.

A server (`llamalab serve`, the embedded SmolLM2-135M, `--max-batch 8`) streams one completion A (greedy,
`ignore_eos`, so it runs its full length). After A's 10th token a second client sends B, streamed, which
runs beside A until A ends (then B's client hangs up and the server cancels it). A's gaps between tokens
from B's arrival to A's end are measured. B is one of:

- `none`: nobody; A's gap alone;
- `plain`: `n` at its cap (the batch size), greedy, nothing else: what a fuller batch costs by itself;
- `small`: `n` at its cap with every per-token feature at its smallest: sampling (temperature, top-p,
  min-p), repetition/presence/frequency penalties, one logit_bias entry, one short stop string, one top
  logprob, a small JSON schema whose answer is long;
- `largest`: the same at the largest size the server accepts: 300 logit_bias entries, 16 stop strings of
  1000 characters that keep half-matching the output, 20 top logprobs, a JSON schema just under 32 KiB
  (an array of objects with 500 optional properties each, whose masks are the slowest to compute).

Besides A's gaps (wall-clock time, which other processes on a shared machine stretch), the server's CPU
time per A token is read from /proc (all its threads, user + system): the work one decode step of the
batch costs, which other processes hardly change. The servers run with OMP_WAIT_POLICY=PASSIVE, so that
this counts work rather than OpenMP threads spinning while they wait for a core (on a busy machine they
would spin most of the time).

`largest` against `small` is what a request's size costs the other streams (it should cost nothing);
against `plain`, what its features cost; against `none`, everything including the fuller batch.
`--bias-entries` changes the largest logit_bias (49152, the whole vocabulary, reproduces issue 15 on
servers that accepted it). One server per tree (`--tree`, each a llamalab checkout whose src/ is put first
on PYTHONPATH) runs for the whole benchmark (only the one measured is busy); each round measures every
tree under every load in turn, so the phases of a shared, busy machine hit them all alike. Figures are
over all gaps of all rounds.

    python benchmarks/largest_request_gap.py [--threads 2] [--dtype bf16] [--rounds 6] [--tree DIR ...]

Prints a markdown table and replaces the `largest-request-gap` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from sections import write_section
from serve import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
MAX_BATCH = 8
WARM_TOKENS = 10  # A's tokens before B is sent
CONTEXT = 2048
VOCAB = 49152  # SmolLM2's
LOADS = ("none", "plain", "small", "largest")
SCHEMA_LIMIT = 32 * 1024  # the server's limit on a response_format schema, in bytes of JSON


def largest_schema() -> dict:
    """An array of objects with as many optional enum properties as fit under the limit: the answer is
    long (minItems) and every key position offers every property left (the slowest masks)."""
    item: dict = {"type": "object", "properties": {}, "additionalProperties": False}
    schema = {"type": "array", "minItems": 300, "items": item}
    for i in range(10_000):
        item["properties"][f"k{i}"] = {
            "type": "string",
            "enum": ["alpha", "beta", "gamma", "delta", "epsilon"],
        }
        if len(json.dumps(schema)) > SCHEMA_LIMIT:
            del item["properties"][f"k{i}"]
            return schema
    return schema


def load_body(kind: str, bias_entries: int) -> dict | None:
    if kind == "none":
        return None
    body = {"model": MODEL, "prompt": "Write a long list of words:", "n": MAX_BATCH, "max_tokens": 400}
    if kind == "plain":
        return {**body, "temperature": 0, "ignore_eos": True}
    features = {
        "temperature": 1.0,
        "top_p": 0.95,
        "min_p": 0.01,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "seed": 0,
    }
    if kind == "small":
        small_schema = {"type": "array", "minItems": 300, "items": {"enum": ["alpha", "beta", "gamma"]}}
        return {
            **body,
            **features,
            "logit_bias": {"50": -1.0},
            "stop": ["\n\n\n\n"],
            "logprobs": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": small_schema}},
        }
    return {
        **body,
        **features,
        "logit_bias": {str((100 + i) % VOCAB): -1.0 for i in range(bias_entries)},
        "stop": ['"alpha", "' + chr(ord("A") + i) * 990 for i in range(16)],
        "logprobs": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": largest_schema()}},
    }


class Load:
    """B: streams `body` on a thread until told to stop, counting its chunks."""

    def __init__(self, url: str, body: dict) -> None:
        self.url, self.body = url, {**body, "stream": True}
        self.stop, self.chunks, self.status = threading.Event(), 0, None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=600) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if self.stop.is_set():
                    break  # leaving the block closes the connection: the server cancels B
                self.chunks += line.startswith("data: {")


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (all threads, user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    server: Server, load: dict | None, new_tokens: int
) -> tuple[list[float], float, float, int | None]:
    """A's gaps (seconds) while B runs, the server's CPU seconds per A token meanwhile, B's chunks per
    second, and B's HTTP status."""
    url = server.url
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    arrivals: list[float] = []
    b, sent, cpu = None, 0.0, 0.0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if json.loads(line[6:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if len(arrivals) == WARM_TOKENS and sent == 0.0:
                sent, cpu = time.perf_counter(), cpu_seconds(server.proc.pid)
                if load is not None:
                    b = Load(url, load)
                    b.thread.start()
    end, cpu = time.perf_counter(), cpu_seconds(server.proc.pid) - cpu
    rate, status = 0.0, None
    if b is not None:
        b.stop.set()
        b.thread.join(600)
        rate, status = b.chunks / (end - sent), b.status
    gaps = [t1 - t0 for t0, t1 in zip(arrivals, arrivals[1:]) if t0 >= sent]
    return gaps, cpu / len(gaps), rate, status


def start(tree: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llamalab.cli", "serve", "--model", MODEL, "--port", str(port),
           "--threads", str(args.threads), "--dtype", args.dtype, "--max-batch", str(MAX_BATCH),
           "--max-queue", "16", "--context", str(CONTEXT)]  # fmt: skip
    server = Server(f"tree-{tree.name}", cmd, f"http://127.0.0.1:{port}", MODEL,
                    env={"PYTHONPATH": str(tree / "src"), "OMP_WAIT_POLICY": "PASSIVE"})  # fmt: skip
    server.wait("/health")
    return server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--new-tokens", type=int, default=50, help="A's length (B arrives after its 10th)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--loads", default=",".join(LOADS), help=f"a comma-separated subset of {','.join(LOADS)}")
    ap.add_argument("--bias-entries", type=int, default=300, help="logit_bias entries of the largest load")
    ap.add_argument("--tree", type=Path, action="append", help="a llamalab checkout (default: this one)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    loads = args.loads.split(",")
    bodies = {kind: load_body(kind, args.bias_entries) for kind in loads}
    gaps: dict[tuple[str, str], list[float]] = {(t.name, k): [] for t in trees for k in loads}
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in gaps}
    cpus: dict[tuple[str, str], list[float]] = {key: [] for key in gaps}
    statuses: dict[tuple[str, str], set] = {key: set() for key in gaps}
    load_before = os.getloadavg()[0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on `kill` too
    servers: dict[Path, Server] = {}
    try:
        for tree in trees:
            servers[tree] = start(tree, args)
        for server in servers.values():
            measure(server, None, 30)  # warm-up: kernels, allocator
        for r in range(args.rounds):
            for tree, server in servers.items():
                for kind in loads:
                    g, cpu, rate, status = measure(server, bodies[kind], args.new_tokens)
                    gaps[tree.name, kind] += g
                    cpus[tree.name, kind].append(cpu)
                    rates[tree.name, kind].append(rate)
                    statuses[tree.name, kind].add(status)
                    print(f"round {r + 1} {tree.name} {kind}: A's median gap {statistics.median(g) * 1e3:.1f} ms, "
                          f"max {max(g) * 1e3:.0f} ms, server CPU {cpu * 1e3:.1f} ms a token; B {status}, "
                          f"{rate:.0f} chunks/s", flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for tree in trees:
        base = statistics.median(gaps[tree.name, loads[0]])
        base_cpu = statistics.median(cpus[tree.name, loads[0]])
        for kind in loads:
            g = gaps[tree.name, kind]
            med, cpu = statistics.median(g), statistics.median(cpus[tree.name, kind])
            status = (
                ",".join(str(s) for s in sorted(statuses[tree.name, kind], key=str) if s is not None) or "-"
            )
            rows.append(
                f"| {tree.name} | {kind} | {len(g)} | {med * 1e3:.1f} | {percentile(g, 0.9) * 1e3:.1f} | "
                f"{max(g) * 1e3:.0f} | {med / base:.2f}x | {cpu * 1e3:.1f} | {cpu / base_cpu:.2f}x | {status} | "
                f"{statistics.median(rates[tree.name, kind]):.0f} |"
            )
    table = (
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs shared with other work (1-minute load "
        f"average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after). Server: SmolLM2-135M, "
        f"{args.dtype}, {args.threads} threads (OMP_WAIT_POLICY=PASSIVE), --max-batch {MAX_BATCH}, --max-queue 16, "
        f"--context {CONTEXT}. "
        f"A: greedy, {args.new_tokens} tokens; B sent after A's {WARM_TOKENS}th token; A's gaps from "
        f"then to its end, all gaps of {args.rounds} interleaved rounds (CPU: the median of the rounds); "
        f"largest load: {args.bias_entries} logit_bias entries.\n\n"
        f"| tree | B | A's gaps | gap median ms | p90 ms | max ms | median vs `{loads[0]}` | server CPU ms "
        f"per A token | CPU vs `{loads[0]}` | B's status | B's chunks/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    if not args.no_write:
        write_section("largest-request-gap", "\n" + table + "\n")


if __name__ == "__main__":
    main()
