"""Batch-1 GEMV speed on the default model's shapes: torch.mv (bf16, fp32) against llamalab's bf16 kernel.

Decode reads every weight once per token, so each shape is timed two ways:
  * stream: a sweep over 30 distinct copies (one per layer, like decode; the head has one), so the weights
    come from DRAM or L3 as they do in a real model;
  * hot: one copy over and over, so it sits in cache (an upper bound no decode reaches).
"model" sweeps all 30 layers' q/k/v, o, gate/up and down plus the head in order: one token's GEMVs.
Each number is the best of `--repeats` sweeps (the machine is shared and noisy), in GB/s of weights read.

`--decode` instead decodes with the real model (bf16, batch 1) through PyTorch ops with torch.mv, through
PyTorch ops with the kernel (splitting each token's time into the GEMVs, timed around each call, and
everything else: norms, RoPE, attention, the KV cache, activations, sampling and Python), and through the
fused native step that runs all of a token in one call.

    python benchmarks/gemv.py [--threads 2] [--repeats 7] [--decode]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from llamalab import kernels

# SmolLM2-135M: hidden 576, intermediate 1536, 9 q / 3 kv heads of 64, vocab 49152, 30 layers.
LAYER = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
HEAD = (49152, 576)
LAYERS = 30


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def methods(gemv) -> dict[str, tuple[torch.dtype, Callable]]:
    out = {"torch.mv bf16": (torch.bfloat16, torch.mv), "torch.mv fp32": (torch.float32, torch.mv)}
    if gemv is not None:
        out["kernel bf16"] = (torch.bfloat16, gemv)
    return out


def sweep_gbps(op, weights: list[torch.Tensor], xs: dict[int, torch.Tensor], repeats: int) -> float:
    pairs = [(w, xs[w.shape[1]]) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return nbytes / best_time(lambda: [op(w, x) for w, x in pairs], repeats) / 1e9


def decode_split(repeats: int, prompt_tokens: int = 128, new_tokens: int = 64) -> None:
    """Per-token decode time of SmolLM2-135M bf16 three ways: PyTorch ops with torch.mv or with the GEMV
    kernel (each token's time split into GEMVs and the rest), and the fused native step (one call a token)."""
    import dataclasses

    import llamalab
    from llamalab.bench import bench_tokens
    from llamalab.generate.sampling import SamplingParams

    llm = llamalab.load("smollm2-135m", dtype="bf16")
    ids = bench_tokens(llm, prompt_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    spent = [0.0, 0]  # seconds inside GEMV calls, calls

    def timed(op):
        def run(w, x):
            t = time.perf_counter()
            y = op(w, x)
            spent[0] += time.perf_counter() - t
            spent[1] += 1
            return y

        return run

    mv, gemv_bf16 = torch.mv, kernels.gemv_bf16
    kernel = gemv_bf16()
    print(
        f"\nSmolLM2-135M bf16 decode, threads={torch.get_num_threads()}, best of {repeats} runs of {new_tokens}"
    )
    print(
        "\n| decode path | ms/token | GEMV ms/token | other ms/token | GEMV calls/token | tok/s |\n"
        "|---|---|---|---|---|---|"
    )
    paths = {"PyTorch ops, torch.mv": False}
    if kernel is not None:
        paths.update({"PyTorch ops, GEMV kernel": True, "fused native step": None})
    for name, use_kernel in paths.items():
        # Swap in timed callables where Linear looks them up; the fused step keeps its GEMVs inside.
        torch.mv = timed(mv)
        kernels.gemv_bf16 = (lambda: timed(kernel)) if use_kernel else (lambda: None)
        best = None
        try:
            with torch.inference_mode():
                for i in range(repeats + 1):  # the first run warms up
                    engine = llm.engine(max_len=prompt_tokens + new_tokens + 1, native=use_kernel is None)
                    engine.add(ids, dataclasses.replace(params))
                    while engine.prefilling:
                        engine.step(decode=False)
                    spent[:] = [0.0, 0]
                    steps, t = 0, time.perf_counter()
                    while engine.active:
                        engine.step()
                        steps += 1
                    total = time.perf_counter() - t
                    run = (total / steps, spent[0] / steps, spent[1] / steps)
                    if i and (best is None or run[0] < best[0]):
                        best = run
        finally:
            torch.mv, kernels.gemv_bf16 = mv, gemv_bf16
        per, gemv, calls = best
        split = f"{gemv * 1e3:.2f} | {(per - gemv) * 1e3:.2f} | {calls:.0f}" if calls else "(inside) | | 0"
        print(f"| {name} | {per * 1e3:.2f} | {split} | {1 / per:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode", action="store_true", help="split real decode time into GEMVs and the rest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.decode:
        decode_split(args.repeats)
        return
    gemv = kernels.gemv_bf16()
    if gemv is None:
        print(f"(native kernel unavailable: {kernels.unavailable_reason()})")
    cols = methods(gemv)
    torch.manual_seed(0)
    shapes = {**{name: (n, k, LAYERS) for name, (n, k) in LAYER.items()}, "head": (*HEAD, 1)}
    table: dict[str, dict[str, float]] = {}  # "gate_up stream" -> {method: GB/s}
    model_gbps: dict[str, float] = {}
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            ops = {col: op for col, (col_dtype, op) in cols.items() if col_dtype == dtype}
            xs = {k: torch.randn(k, dtype=dtype) for k in (576, 1536)}
            ws = {
                name: [torch.randn(n, k, dtype=dtype) for _ in range(c)] for name, (n, k, c) in shapes.items()
            }
            for name, (*_, c) in shapes.items():
                for regime, weights in (("stream", ws[name]), ("hot", ws[name][:1] * c)):
                    res = table.setdefault(f"{name} {regime}", {})
                    for col, op in ops.items():
                        res[col] = sweep_gbps(op, weights, xs, args.repeats)
            # One token's GEMVs in model order: layer by layer, then the head.
            model = [ws[name][i] for i in range(LAYERS) for name in LAYER] + ws["head"]
            for col, op in ops.items():
                model_gbps[col] = sweep_gbps(op, model, xs, args.repeats)
            del ws, model

    names = list(cols)
    print(f"\nthreads={args.threads}, best of {args.repeats}; GB/s of weights read (higher is better)\n")
    header = "| shape | N x K | " + " | ".join(names) + " | kernel / mv bf16 |"
    print(header)
    print("|" + "---|" * (len(names) + 3))
    for key, res in table.items():
        n, k, c = shapes[key.split()[0]]
        dims = f"{n}x{k}" + (f" (x{c})" if c > 1 else "")
        speedup = f"{res['kernel bf16'] / res['torch.mv bf16']:.2f}x" if gemv is not None else "-"
        print(f"| {key} | {dims} | " + " | ".join(f"{res[c]:.1f}" for c in names) + f" | {speedup} |")
    # Milliseconds per token for the model sweep: 2 bytes a weight in bf16, 4 in fp32.
    params = sum(n * k for n, k in LAYER.values()) * LAYERS + HEAD[0] * HEAD[1]
    ms = {c: params * cols[c][0].itemsize / gbps / 1e6 for c, gbps in model_gbps.items()}
    speedup = f"{ms['torch.mv bf16'] / ms['kernel bf16']:.2f}x" if gemv is not None else "-"
    cells = " | ".join(f"{model_gbps[c]:.1f} ({ms[c]:.1f} ms)" for c in names)
    print(f"| model: 1 token | 30 layers + head | {cells} | {speedup} |")


if __name__ == "__main__":
    main()
