"""Decode speed of weight-quantized models against fp32/bf16 and llama.cpp, in one run.

Measures batch-1 prefill and decode tokens/s (`llamalab.bench.bench_model`: best of `--repeats`) for the
default model in fp32 and bf16, and quantized (RTN; the weights do not change the kernel's speed) to int8
per channel (`aten._weight_int8pack_mm`) and int4 g64 (`aten._weight_int4pack_mm_for_cpu`) in fp32 and bf16
compute; then llama.cpp (llama-cpp-python) on Q8_0 and Q4_0 GGUFs exported by `llamalab export` from the
same model. It also checks that llama.cpp and llamalab give the same greedy text on the same exported
weights (our loader reads the exported GGUF back). Prints a markdown table.

    .venv/bin/python benchmarks/quant_decode.py --threads 2 --prompt 128 --new 64
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having"


def llama_cpp_bench(path: Path, ids: list[int], new: int, threads: int, repeats: int) -> tuple[float, float]:
    """Prefill = time to the first generated token; decode = the next `new` tokens (greedy)."""
    from llama_cpp import Llama

    ll = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + new + 8,
               n_batch=512, verbose=False)  # fmt: skip
    pre, dec = [], []
    for _ in range(repeats + 1):
        ll.reset()
        t0 = time.perf_counter()
        gen = ll.generate(ids, top_k=1, temp=0.0, reset=True)
        next(gen)
        t1 = time.perf_counter()
        for _ in range(new):
            next(gen)
        t2 = time.perf_counter()
        gen.close()
        pre.append(len(ids) / (t1 - t0))
        dec.append(new / (t2 - t1))
    return max(pre[1:]), max(dec[1:])


def llama_cpp_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    ll = Llama(model_path=str(path), n_ctx=len(ids) + n + 8, verbose=False, n_threads=2)
    out = []
    for tok in ll.generate(ids, top_k=1, temp=0.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llamalab
    from llamalab.bench import bench_model, bench_tokens
    from llamalab.quant import prepare_model, quantize_model
    from llamalab.quant.base import QuantLinear
    from llamalab.quant.gguf_export import export_gguf

    base = llamalab.load("smollm2-135m", dtype="fp32")
    ids = bench_tokens(base, args.prompt)
    rows = []

    def ours(label, llm):
        r = bench_model(llm, args.prompt, args.new, 1, args.repeats)
        qb = sum(m.nbytes for m in llm.model.modules() if isinstance(m, QuantLinear))
        rows.append(
            (label, r["prefill_tokens_per_s"], r["decode_tokens_per_s"], llm.model.weight_bytes(), qb)
        )
        print(rows[-1], flush=True)

    ours("llamalab fp32", base)
    ours("llamalab bf16", llamalab.load("smollm2-135m", dtype="bf16"))
    for label, bits, group in (("int8 (per channel)", 8, -1), ("int4 g64", 4, 64)):
        llm = copy.copy(base)
        llm.model = copy.deepcopy(base.model)
        quantize_model(llm, "rtn", bits, group, progress=False)
        prepare_model(llm.model)
        ours(f"llamalab {label}, fp32 compute", llm)
        llm_bf = copy.copy(llm)
        llm_bf.model = copy.deepcopy(llm.model).to(torch.bfloat16)
        ours(f"llamalab {label}, bf16 compute", llm_bf)
        del llm, llm_bf

    tmp = Path(tempfile.mkdtemp())
    greedy = []
    for qtype in ("q8_0", "q4_0"):
        path = export_gguf("smollm2-135m", tmp / f"smollm-{qtype}.gguf", qtype, llm=base)
        pre, dec = llama_cpp_bench(path, ids, args.new, args.threads, args.repeats)
        size = path.stat().st_size
        rows.append((f"llama.cpp {qtype.upper()} (our export)", round(pre, 2), round(dec, 2), size, None))
        print(rows[-1], flush=True)
        # the same greedy text: llama.cpp vs llamalab reading the exported file
        ours_llm = llamalab.load(str(path))
        p = ours_llm.encode(PROMPT)
        a = ours_llm.generate_sequences([p], max_new_tokens=32)[0].output_ids
        b = llama_cpp_greedy(path, p, 32)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        # teacher-forced: does our argmax pick llama.cpp's token at each step of llama.cpp's continuation?
        top = ours_llm.logits(p + b).argmax(-1)[len(p) - 1 : len(p) - 1 + len(b)].tolist()
        agree = sum(int(x == y) for x, y in zip(top, b))
        greedy.append((qtype, same, len(a), agree, ours_llm.decode(a)[:70], ours_llm.decode(b)[:70]))

    print(f"\nthreads={args.threads}, batch=1, prompt={args.prompt} tokens, decode {args.new} tokens, "
          f"best of {args.repeats}, model smollm2-135m\n")  # fmt: skip
    print(
        "| engine / weights | prefill tok/s | decode tok/s | weight bytes in memory (file for llama.cpp) | quantized linear bytes |"
    )
    print("|---|---|---|---|---|")
    for label, pre, dec, wb, qb in rows:
        print(
            f"| {label} | {pre:.1f} | {dec:.1f} | {wb / 1e6:.1f} MB | {'' if qb is None else f'{qb / 1e6:.1f} MB'} |"
        )
    print(
        "\n| GGUF | identical greedy prefix (llama.cpp vs llamalab, same file) | our argmax = llama.cpp's token "
        "(teacher-forced) | llamalab text | llama.cpp text |"
    )
    print("|---|---|---|---|---|")
    for qtype, same, n, agree, ta, tb in greedy:
        print(f"| {qtype.upper()} | {same}/{n} | {agree}/{n} | {ta!r} | {tb!r} |")


if __name__ == "__main__":
    main()
