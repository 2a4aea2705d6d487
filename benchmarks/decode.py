"""Prefill and decode speed of llamalab against transformers and llama.cpp, in the same run.

All peers run the same weights: the embedded SmolLM2-135M GGUF, which llamalab dequantizes, llama.cpp runs as
stored (Q4_1), and transformers runs as the dense HF checkpoint `llamalab convert` writes from it (its
standard fp32/bf16 path; transformers 5 would otherwise keep GGUF weights packed). Same prompt of real text,
same thread count, batch 1, greedy. Prefill is llama-bench's pp (prompt tokens/s), decode its tg (generated tokens/s after the prompt).

    python benchmarks/decode.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--no-write]

Prints a markdown table and replaces the `decode` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import tempfile
import time
from pathlib import Path

import torch
from quant_decode import llama_cpp_bench
from sections import write_section

import llamalab
from llamalab.bench import bench_model, bench_tokens
from llamalab.convert import convert_to_hf
from llamalab.io.registry import resolve_alias

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeats: int) -> float:
    """Smallest wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_transformers(hf_dir: Path, ids: list[int], new: int, dtype: torch.dtype, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        prefill = best(lambda: model(x, use_cache=True), repeats)

        def gen():
            model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        total = best(gen, repeats)
    return {"prefill": len(ids) / prefill, "decode": (new - 1) / (total - prefill)}


def bench_llama_cpp(path: Path, ids: list[int], new: int, threads: int, repeats: int) -> dict | None:
    """llama.cpp through llama-cpp-python's own greedy generate loop (None when it is not installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    prefill, decode = llama_cpp_bench(path, ids, new, threads, repeats)
    return {"prefill": prefill, "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_alias("smollm2-135m")
    rows = []
    ours = {}
    for dtype in ("fp32", "bf16"):
        llm = llamalab.load("smollm2-135m", dtype=dtype)
        r = bench_model(llm, args.prompt_tokens, args.new_tokens, 1, args.repeats)
        ours[dtype] = r
        rows.append(
            (f"llamalab {dtype}", r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r["decode_gb_per_s"])
        )
        ids = bench_tokens(llm, args.prompt_tokens)
        del llm
    peers = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2-135m-hf"
        convert_to_hf("smollm2-135m", hf_dir)  # the same weights as a dense HF checkpoint
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peers[f"transformers {dtype}"] = bench_transformers(
                hf_dir, ids, args.new_tokens, torch_dtype, args.repeats
            )
    cpp = bench_llama_cpp(path, ids, args.new_tokens, args.threads, args.repeats)
    if cpp:
        peers["llama.cpp (Q4_1 as stored)"] = cpp
    for name, r in peers.items():
        rows.append((name, r["prefill"], r["decode"], None))
    base = peers["transformers fp32"]
    lines = [
        f"SmolLM2-135M-Instruct, {args.threads} threads, batch 1, prompt {args.prompt_tokens} tokens of real "
        f"text, {args.new_tokens} new tokens, greedy; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}.",
        "",
        "| engine | prefill tok/s | decode tok/s | decode GB/s of weights | prefill vs transformers fp32 "
        "| decode vs transformers fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, pre, dec, gbs in rows:
        lines.append(
            f"| {name} | {pre:.1f} | {dec:.1f} | {'' if gbs is None else f'{gbs:.1f}'} | "
            f"{pre / base['prefill']:.2f}x | {dec / base['decode']:.2f}x |"
        )
    if cpp:
        lines += [
            "",
            f"llamalab bf16 vs llama.cpp: prefill {ours['bf16']['prefill_tokens_per_s'] / cpp['prefill']:.2f}x, "
            f"decode {ours['bf16']['decode_tokens_per_s'] / cpp['decode']:.2f}x.",
        ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(
            "decode",
            table + f"\n\nCommand: `python benchmarks/decode.py --threads {args.threads}`",
        )


if __name__ == "__main__":
    main()
