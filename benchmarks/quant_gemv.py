"""Batch-1 weight-only products on one large matrix: llamalab's int8 / int4 / NF4 kernels against its bf16 GEMV.

One (12288 x 1536) weight, bf16 activations, one row of x: the packed kernels (`llamalab.kernels.quant_matmul`,
reading the portable layout) against the dense bf16 GEMV (`gemv_bf16`) in the same run. Every case runs once
per round, in turn, for `--rounds` rounds and keeps its best (the machine's speed drifts); the figure is G
weights per second, which says whether a kernel is bound by memory (the bf16 GEMV streams 2 bytes a weight) or
by the instructions that decode each code.

    python benchmarks/quant_gemv.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from llamalab import kernels
from llamalab.quant.base import NO_PERM, UniformQuantLinear
from llamalab.quant.gguf_linear import GGUFLinear
from llamalab.quant.nf4 import NF4Linear
from llamalab.quant.quantizer import group_affine

N, K = 12288, 1536


def per_call(fn, calls: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the per-core rate)")
    ap.add_argument("--rounds", type=int, default=5, help="every case runs once per round; the best is kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gemv, matmul = kernels.gemv_bf16(), kernels.quant_matmul()
    if gemv is None:
        raise SystemExit(f"the native kernels are unavailable: {kernels.unavailable_reason()}")
    w = torch.randn(N, K)
    x = torch.randn(1, K).bfloat16()
    wb = w.bfloat16()
    cases = {"bf16 GEMV (dense)": lambda: gemv(wb, x[0])}
    for label, bits, group in (("int8 per channel", 8, -1), ("int4 g64", 4, 64), ("int4 g128", 4, 128)):
        m = UniformQuantLinear.from_codes(*group_affine(w, bits, group), bits, group).to(torch.bfloat16)
        for path, int_dot in (("exact", False), ("integer", True)):
            cases[f"{label}, {path}"] = lambda m=m, i=int_dot: matmul(
                x, m.qweight, m.scales, m.qzeros, NO_PERM, i
            )
    for qtype in ("Q4_0", "Q4_1", "Q8_0"):
        g = GGUFLinear.from_weight(w, qtype)
        for path, int_dot in (("exact", False), ("integer", True)):
            cases[f"GGUF {qtype}, {path}"] = lambda g=g, i=int_dot: matmul(
                x, *g.native_tensors(torch.bfloat16), i
            )
    nf4 = NF4Linear.from_weight(w, None)
    nf4.prepare()
    nf4_tensors = nf4.native_tensors(torch.bfloat16)
    cases["NF4 (blocks of 64), exact"] = lambda: matmul(x, *nf4_tensors, False)

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, fn in cases.items():
            best[label] = min(best.get(label, float("inf")), per_call(fn))
    print(f"\n{N} x {K} weight, one bf16 row of x, {args.threads} thread(s), best of {args.rounds} rounds\n")
    print("| kernel | us per call | G weights/s | vs bf16 GEMV |")
    print("|---|---|---|---|")
    dense = best["bf16 GEMV (dense)"]
    for label, t in best.items():
        print(f"| {label} | {t * 1e6:.0f} | {N * K / t / 1e9:.1f} | {dense / t:.2f}x |")


if __name__ == "__main__":
    main()
