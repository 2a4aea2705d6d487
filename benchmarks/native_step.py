"""The raw native decode step on a GGUF file run as stored, and llama.cpp's own decode rate on the same file.

Ours: `NativeDecoder` steps of one token (batch 1, a dense cache), timed in batches of 10 steps; the best
batch of `--rounds` is reported, in ms a step (the VM's speed drifts; the best of many short batches is what
separates two builds, BENCHMARKS.md). llama.cpp: a 128-token prompt, then `--new` greedy tokens through
llama-cpp-python, reported from llama.cpp's own counters (`llama_perf_context`: evaluation time only, no
Python), best of 3.

    python benchmarks/native_step.py FILE.gguf --threads 2 --rounds 60
    python benchmarks/native_step.py FILE.gguf --threads 1 --llama-cpp      # both, on one thread

Comparing two builds of the kernels: run this alternately from two checkouts (PYTHONPATH=<checkout>/src).
"""

from __future__ import annotations

import argparse
import time

import torch


def step_ms(path: str, rounds: int) -> float:
    import llamalab
    from llamalab.generate.native_step import NativeDecoder
    from llamalab.kv.dense import DenseCache

    model = llamalab.load(path, dtype="stored").model
    cache = DenseCache.for_model(model.config, 256, dtype=model.model.norm.weight.dtype)
    decoder, why = NativeDecoder.create(model, cache)
    if decoder is None:
        raise SystemExit(f"the native step does not run here: {why}")
    ids, best = torch.tensor([[1]]), float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            t0 = time.perf_counter()
            for s in range(10):
                decoder(ids, [100 + s], [0])
            best = min(best, (time.perf_counter() - t0) / 10)
    return best * 1e3


def llama_cpp_tokens_per_s(path: str, threads: int, new: int) -> float:
    import llamalab
    from llamalab import llama_cpp_peer
    from llamalab.bench import bench_tokens

    ll_mod = llama_cpp_peer.load()
    ids = bench_tokens(llamalab.load("smollm2-135m", dtype="fp32"), 128)
    ll = ll_mod.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False)
    best = 0.0
    for _ in range(4):  # the first warms up
        ll.reset()
        ll_mod.llama_perf_context_reset(ll._ctx.ctx)
        gen = ll.generate(ids, top_k=1, temp=0.0, reset=True)
        for _ in range(new + 1):
            next(gen)
        gen.close()
        perf = ll_mod.llama_perf_context(ll._ctx.ctx)
        best = max(best, 1000 * perf.n_eval / perf.t_eval_ms)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="a GGUF file with Q4_0/Q4_1/Q8_0/Q4_K/Q6_K layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=60, help="batches of 10 steps; the best is kept")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's decode rate on the same file")
    ap.add_argument("--new", type=int, default=64, help="llama.cpp: tokens decoded per run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"llamalab native step: {step_ms(args.path, args.rounds):.3f} ms ({args.threads} threads)")
    if args.llama_cpp:
        rate = llama_cpp_tokens_per_s(args.path, args.threads, args.new)
        print(
            f"llama.cpp, its own counters: {rate:.1f} tok/s = {1000 / rate:.2f} ms a token ({args.threads} threads)"
        )


if __name__ == "__main__":
    main()
