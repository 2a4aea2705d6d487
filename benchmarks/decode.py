"""Prefill and decode speed of llamalab against transformers and llama.cpp, in the same run.

All peers run the same weights: the embedded SmolLM2-135M GGUF, which llamalab dequantizes, llama.cpp runs as
stored (Q4_1), and transformers runs as the dense HF checkpoint `llamalab convert` writes from it (its
standard fp32/bf16 path; transformers 5 would otherwise keep GGUF weights packed). Same prompt of real text,
same thread count, batch 1, greedy. Prefill is llama-bench's pp (prompt tokens/s), decode its tg (generated tokens/s after the prompt).

    python benchmarks/decode.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--rounds 3] [--no-write]

Prints a markdown table and replaces the `decode` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from quant_decode import llama_cpp_bench
from sections import write_section
from tqdm import tqdm

import llamalab
from llamalab.bench import bench_model, bench_tokens
from llamalab.convert import convert_to_hf
from llamalab.io.registry import resolve_alias

ROOT = Path(__file__).resolve().parents[1]


Result = tuple[float, float, "float | None"]  # prefill tok/s, decode tok/s, decode GB/s of weights


def best(fn, repeats: int) -> float:
    """Smallest wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth_gbps(repeats: int, nbytes: int = 1 << 30) -> float:
    """The memory read bandwidth the current threads reach: the best of `repeats` sums over a 1 GiB fp32
    buffer (torch's vectorised reduction reads it once, at full speed). Batch-1 decode reads every weight
    once a token, so this is its ceiling."""
    x = torch.ones(nbytes // 4)
    return nbytes / best(lambda: x.sum(), repeats) / 1e9


def transformers_runner(hf_dir: Path, ids: list[int], new: int, dtype: torch.dtype) -> Callable[[], Result]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    x = torch.tensor([ids])

    def run() -> Result:
        with torch.inference_mode():
            prefill = best(lambda: model(x, use_cache=True), 1)
            total = best(
                lambda: model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False), 1
            )
        return len(ids) / prefill, (new - 1) / (total - prefill), None

    return run


def llamalab_runner(llm, prompt: int, new: int) -> Callable[[], Result]:
    def run() -> Result:
        r = bench_model(llm, prompt, new, 1, repeats=1)
        return r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r["decode_gb_per_s"]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="each round runs every engine once, in turn; the best round of each is kept (default 3)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_alias("smollm2-135m")
    runners: dict[str, Callable[[], Result]] = {}
    for dtype in ("fp32", "bf16"):
        llm = llamalab.load("smollm2-135m", dtype=dtype)
        runners[f"llamalab {dtype}"] = llamalab_runner(llm, args.prompt_tokens, args.new_tokens)
    ids = bench_tokens(llm, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2-135m-hf"
        convert_to_hf("smollm2-135m", hf_dir)  # the same weights as a dense HF checkpoint
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            runners[f"transformers {dtype}"] = transformers_runner(hf_dir, ids, args.new_tokens, torch_dtype)
    cpp = importlib.util.find_spec("llama_cpp") is not None
    if cpp:
        runners["llama.cpp (Q4_1 as stored)"] = lambda: (
            *llama_cpp_bench(path, ids, args.new_tokens, args.threads, 1),
            None,
        )
    # The machine's bandwidth drifts with its neighbours (a VM): interleaving the engines round by round
    # and keeping each one's best round compares them under the same conditions.
    results: dict[str, list[Result]] = {name: [] for name in runners}
    ceilings = []
    for _ in tqdm(range(args.rounds), desc="rounds"):
        ceilings.append(read_bandwidth_gbps(3))
        for name, run in runners.items():
            results[name].append(run())
    best_of = {name: tuple(max(col, default=None) if col[0] is not None else None for col in zip(*rs))
               for name, rs in results.items()}  # fmt: skip
    ceiling = max(ceilings)
    base = best_of["transformers fp32"]
    lines = [
        f"SmolLM2-135M-Instruct, {args.threads} threads, batch 1, prompt {args.prompt_tokens} tokens of real "
        f"text, {args.new_tokens} new tokens, greedy; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; best of {args.rounds} interleaved rounds. Memory read bandwidth with these "
        f"threads: {ceiling:.1f} GB/s (a sum over 1 GiB, best of the rounds), the ceiling of batch-1 decode, "
        "which reads every weight once a token.",
        "",
        "| engine | prefill tok/s | decode tok/s | decode GB/s of weights | % of read bandwidth "
        "| prefill vs transformers fp32 | decode vs transformers fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (pre, dec, gbs) in best_of.items():
        bw = " | " if gbs is None else f"{gbs:.1f} | {100 * gbs / ceiling:.0f}%"
        lines.append(
            f"| {name} | {pre:.1f} | {dec:.1f} | {bw} | {pre / base[0]:.2f}x | {dec / base[1]:.2f}x |"
        )
    ours = best_of["llamalab bf16"]
    if cpp:
        peer = best_of["llama.cpp (Q4_1 as stored)"]
        lines += [
            "",
            f"llamalab bf16 vs llama.cpp: prefill {ours[0] / peer[0]:.2f}x, decode {ours[1] / peer[1]:.2f}x.",
        ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(
            "decode",
            table
            + f"\n\nCommand: `python benchmarks/decode.py --threads {args.threads} --rounds {args.rounds}`",
        )


if __name__ == "__main__":
    main()
