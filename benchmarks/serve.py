"""Serving throughput and time to first token under concurrent streaming clients, llamalab against
llama-cpp-python's OpenAI server, in the same run, on the same GGUF (the embedded SmolLM2-135M).

Both servers run as subprocesses on loopback with the same thread count. For each level of concurrency
(1, 4, 8, 16 clients) every client streams `--rounds` chat completions one after another, each with its own
short prompt and exactly `--max-tokens` generated tokens (EOS is banned with logit_bias, a standard OpenAI
field both servers honour, so both do the same work). Reported per level: generated tokens, wall time,
aggregate generated tokens/s (all clients together), time to first token (request sent -> first content
delta; median and p90), and the speed-up over one client.

llama-cpp-python's server runs one request at a time (no continuous batching; started with
`--interrupt_requests False`, since by default a new request cuts off the running stream), so its aggregate
rate stays at its single-stream rate while its TTFT grows with the queue; llamalab decodes all active
requests in one batched forward pass per step.

    python benchmarks/serve.py [--threads 2] [--max-tokens 64] [--rounds 2] [--out docs/benchmarks/serve.md]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llamalab.io.registry import resolve_alias

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 8, 16)
TOPICS = [
    "the sea",
    "a cat",
    "autumn",
    "the moon",
    "a library",
    "coffee",
    "mountains",
    "a train",
    "rain",
    "a garden",
    "the city at night",
    "a robot",
    "bread",
    "a lighthouse",
    "winter",
    "an old map",
    "a violin",
    "the desert",
    "a river",
    "a market",
    "snow",
    "a bridge",
    "the stars",
    "a forest",
    "a clock",
    "a kite",
    "thunder",
    "tea",
    "a museum",
    "a bicycle",
    "the ocean floor",
    "a candle",
]
BANNED = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: every answer runs to max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], url: str, model: str, env: dict | None = None) -> None:
        self.name, self.url, self.model = name, url, model
        self.log = open(f"/tmp/bench-serve-{name.split()[0]}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait(self, path: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_llamalab(gguf: Path, threads: int, ctx: int, dtype: str) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llamalab.cli",
        "serve",
        "--model",
        str(gguf),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-batch",
        str(max(LEVELS)),
        "--context",
        str(ctx),
        "--dtype",
        dtype,
        "--served-model-name",
        "smollm2-135m",
    ]
    server = Server("llamalab serve", cmd, f"http://127.0.0.1:{port}", "smollm2-135m")
    server.wait("/health")
    return server


def start_llama_cpp(gguf: Path, threads: int, ctx: int) -> Server | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llamalab.llama_cpp_peer",  # llama_cpp.server, with llama.cpp's CPU backend loaded first
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--model_alias",
        "smollm2-135m",
        "--interrupt_requests",  # its default cuts off a running stream when a new request arrives
        "False",
    ]
    server = Server("llama-cpp-python server", cmd, f"http://127.0.0.1:{port}", "smollm2-135m")
    server.wait("/v1/models")
    return server


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": BANNED,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first, chunks, usage, finish = None, 0, None, None
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            for c in data.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
                finish = c.get("finish_reason") or finish
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else (max_tokens if finish == "length" else chunks)
    return {"ttft": (first or done) - sent, "tokens": tokens, "finish": finish}


async def run_level(server: Server, clients: int, rounds: int, max_tokens: int) -> dict:
    async def client_loop(k: int, client: httpx.AsyncClient) -> list[dict]:
        out = []
        for r in range(rounds):
            topic = TOPICS[(k * rounds + r) % len(TOPICS)]
            out.append(await one_request(client, server, f"Write a short poem about {topic}.", max_tokens))
        return out

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=1200, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(k, client) for k in range(clients)))
        wall = time.perf_counter() - start
    flat = [x for rs in results for x in rs]
    ttfts = sorted(x["ttft"] for x in flat)
    tokens = sum(x["tokens"] for x in flat)
    return {
        "clients": clients,
        "requests": len(flat),
        "tokens": tokens,
        "wall": wall,
        "rate": tokens / wall,
        "ttft_median": statistics.median(ttfts),
        "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


def bench_server(server: Server, rounds: int, max_tokens: int) -> list[dict]:
    asyncio.run(run_level(server, 1, 1, 8))  # warm-up
    rows = []
    for clients in LEVELS:
        row = asyncio.run(run_level(server, clients, rounds, max_tokens))
        row["server"] = server.name
        rows.append(row)
        print(
            f"  {server.name}: {clients:2d} clients  {row['rate']:7.1f} tok/s  "
            f"TTFT median {row['ttft_median']:.2f} s",
            flush=True,
        )
    base = rows[0]["rate"]
    for row in rows:
        row["speedup"] = row["rate"] / base
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| server | clients | requests | generated tokens | wall s | aggregate tok/s | vs 1 client | "
        "TTFT median s | TTFT p90 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | "
            f"{r['rate']:.1f} | {r['speedup']:.2f}x | {r['ttft_median']:.2f} | {r['ttft_p90']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "serve.md")
    args = ap.parse_args()
    gguf = resolve_alias("smollm2-135m")
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    peer_note = ""
    for start in ("llamalab", "llama.cpp"):
        if start == "llama.cpp" and args.no_peer:
            continue
        print(f"starting {start} ...", flush=True)
        try:
            server = (
                start_llamalab(gguf, args.threads, args.ctx, args.dtype)
                if start == "llamalab"
                else start_llama_cpp(gguf, args.threads, args.ctx)
            )
        except (RuntimeError, TimeoutError) as e:
            if start == "llamalab":
                raise
            peer_note = f"llama-cpp-python's server could not be started here ({e})."
            continue
        if server is None:
            peer_note = "llama-cpp-python is not installed; no peer row."
            continue
        try:
            rows += bench_server(server, args.rounds, args.max_tokens)
        finally:
            server.stop()

    cpu = platform.processor() or platform.machine()
    header = (
        f"Model: SmolLM2-135M-Instruct, `{gguf.name}` (llamalab dequantizes it to {args.dtype}; llama.cpp runs "
        f"it as stored). Threads: {args.threads} per server. Batch: llamalab --max-batch {max(LEVELS)}, "
        f"llama-cpp-python one request at a time. Context: {args.ctx}. Each client streams {args.rounds} "
        f"chat completions one after another, {args.max_tokens} generated tokens each (EOS banned), greedy. "
        f"Machine: {os.cpu_count()} logical CPUs ({cpu}), Python {platform.python_version()}; 1-minute load "
        f"average {load_before:.1f} before the run and {os.getloadavg()[0]:.1f} after it (other processes "
        f"competing for the cores slow both servers and make the figures noisy)."
    )
    md = table(rows)
    print()
    print(header)
    print()
    print(md)
    if peer_note:
        print("\n" + peer_note)
    cmd = "python benchmarks/serve.py " + " ".join(sys.argv[1:])
    llamalab_rows = {r["clients"]: r for r in rows if r["server"].startswith("llamalab")}
    ratio = llamalab_rows[8]["rate"] / llamalab_rows[1]["rate"]
    doc = f"""# Serving benchmark: concurrent streaming clients

{header}

{md}

{peer_note}

llamalab's aggregate throughput at 8 clients is {ratio:.2f}x its single-client throughput.

Command (run on an otherwise idle machine; load from other processes changes absolute numbers):

    {cmd.strip()}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(re.sub(r"\n{3,}", "\n\n", doc))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
