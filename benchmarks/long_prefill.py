"""Peak memory and time of a long prefill through the engine: chunked prefill into the dense KV cache, each
chunk's attention through PyTorch SDPA (its CPU kernel never materialises the (chunk x T) scores), against
an "eager" attention that materialises the softmax matrix (transformers' eager path), whose peak grows as
T x chunk (T^2 unchunked, `--chunk 0`). Each configuration runs in a fresh process; the figure is its peak RSS
during the prefill (VmHWM, reset after loading through /proc/self/clear_refs) minus the RSS before it: the
prefill's working memory. The weights and the KV cache (allocated and zeroed with the engine, before the
reset) are not in it; the cache's size is reported beside it.

    python benchmarks/long_prefill.py --lengths 2K,4K,8K --backends sdpa,eager --threads 2
    python benchmarks/long_prefill.py --lengths 32K --backends sdpa --chunk 2048   # the long one, once
    python benchmarks/long_prefill.py --lengths 2K,4K,8K --backends eager --chunk 0  # unchunked, as transformers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from llamalab.model.attention import register_attention_backend
from llamalab.model_options import ModelOptions, load_model
from llamalab.generate.sampling import SamplingParams

@register_attention_backend("eager")
def eager(q, k, v, mask, scale, is_causal):
    # transformers' eager attention: the whole (T x L) score matrix in fp32, then softmax, then @ v.
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, L)
    if mask is None and is_causal and q.shape[2] > 1:
        T, L = q.shape[2], k.shape[2]
        mask = torch.ones(T, L, dtype=torch.bool).tril(L - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)

T, chunk, backend, dtype, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
opts = ModelOptions(dtype=dtype, threads=threads)
if T + 1 > 8192:
    opts = ModelOptions(dtype=dtype, threads=threads, rope_scaling="yarn", rope_factor=(T + 1) / 8192)
llm = load_model(opts)
llm.model.set_attention_backend(backend)
ids = torch.randint(100, 40000, (T,)).tolist()
engine = llm.engine(max_batch=1, max_len=T + 1, native=False, prefill_chunk=chunk)
def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: loading's peak is not counted
base = rss_kib("VmRSS:")
t0 = time.perf_counter()
engine.add(ids, SamplingParams(max_new_tokens=1))
while engine.active:
    engine.step()
seconds = time.perf_counter() - t0
peak = rss_kib("VmHWM:")
print(json.dumps({"tokens": T, "chunk": chunk, "backend": backend, "dtype": dtype, "threads": threads,
                  "seconds": round(seconds, 1), "tokens_per_s": round(T / seconds, 1),
                  "peak_mib_over_model": round((peak - base) / 1024, 1), "kv_cache_mib": round(engine.cache.nbytes() / 2**20, 1)}))
"""


def main() -> None:
    from llamalab.eval.cli import parse_lengths

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2K,4K,8K")
    p.add_argument("--backends", default="sdpa,eager")
    p.add_argument(
        "--chunk", type=int, default=512, help="Prefill chunk in tokens; 0: the whole prompt at once."
    )
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="Append each result as one JSON line here.")
    args = p.parse_args()
    for T in parse_lengths(args.lengths):
        for backend in args.backends.split(","):
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(T),
                str(args.chunk or T),
                backend,
                args.dtype,
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{backend} {T}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
