"""Decode speed of weight-quantized models against fp32/bf16 and llama.cpp, in one run.

Measures batch-1 prefill and decode tokens/s for the default model in fp32 and bf16; quantized (RTN; the
weights do not change a kernel's speed) to int8 per channel and int4 g64, and NF4 (QLoRA's storage), on
llamalab's native kernels (which read the packed codes in the fused decode step) in fp32 and bf16 compute;
the same in bf16 without them (LLAMALAB_KERNELS=0, as before the native ones: PyTorch's weight-only kernels
`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`; NF4 dequantized on the fly); and llama.cpp (llama-cpp-python) on Q8_0 and Q4_0 GGUFs
exported by `llamalab export` from the same model. The machine's speed drifts (a VM), so every engine runs
once per round, in turn, for `--rounds` rounds, and each keeps its best. It also checks that llama.cpp and
llamalab give the same greedy text on the same exported weights (our loader reads the exported GGUF back).
Prints a markdown table.

    .venv/bin/python benchmarks/quant_decode.py --threads 2 --prompt 128 --new 64 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

PROMPT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having"


def llama_cpp_bench(path: Path, ids: list[int], new: int, threads: int, repeats: int) -> tuple[float, float]:
    """Prefill = time to the first generated token; decode = the next `new` tokens (greedy)."""
    from llamalab import llama_cpp_peer

    Llama = llama_cpp_peer.load().Llama

    ll = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + new + 8,
               n_batch=512, verbose=False)  # fmt: skip
    pre, dec = [], []
    for _ in range(repeats + 1):  # the first run warms up
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
    from llamalab import llama_cpp_peer

    Llama = llama_cpp_peer.load().Llama

    ll = Llama(model_path=str(path), n_ctx=len(ids) + n + 8, verbose=False, n_threads=2)
    out = []
    for tok in ll.generate(ids, top_k=1, temp=0.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


@contextlib.contextmanager
def pytorch_kernels_only() -> Iterator[None]:
    """LLAMALAB_KERNELS=0 inside: modules prepared here take PyTorch's layouts, and nothing native runs."""
    from llamalab import kernels

    os.environ["LLAMALAB_KERNELS"] = "0"
    kernels.reset()
    try:
        yield
    finally:
        del os.environ["LLAMALAB_KERNELS"]
        kernels.reset()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="every engine runs once per round; best kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llamalab
    from llamalab.bench import bench_model, bench_tokens
    from llamalab.io.gguf_export import export_gguf
    from llamalab.quant import prepare_model, quantize_model
    from llamalab.quant.base import QuantLinear

    base = llamalab.load("smollm2-135m", dtype="fp32")
    ids = bench_tokens(base, args.prompt)
    engines: dict[str, tuple] = {}  # label -> (model or GGUF path, PyTorch kernels only)

    engines["llamalab fp32"] = (base, False)
    engines["llamalab bf16"] = (llamalab.load("smollm2-135m", dtype="bf16"), False)
    quantized = (
        ("int8 (per channel)", "rtn", 8, -1),
        ("int4 g64", "rtn", 4, 64),
        ("NF4 (QLoRA)", "nf4", 4, 64),
    )
    for label, method, bits, group in quantized:
        llm = copy.copy(base)
        llm.model = copy.deepcopy(base.model)
        quantize_model(llm, method, bits, group, progress=False)
        for torch_only in (False, True):
            with pytorch_kernels_only() if torch_only else contextlib.nullcontext():
                for dtype in (torch.float32, torch.bfloat16):
                    if torch_only and dtype == torch.float32:
                        continue  # PyTorch's kernels are for half-precision compute (fp32 dequantizes)
                    q = copy.copy(llm)
                    q.model = prepare_model(copy.deepcopy(llm.model).to(dtype))
                    if not torch_only:
                        kernel = "native"
                    elif method == "nf4":
                        kernel = "dequantized on the fly (PyTorch has no NF4 kernel)"
                    else:
                        kernel = "PyTorch weight-only kernels"
                    name = "fp32" if dtype == torch.float32 else "bf16"
                    engines[f"llamalab {label}, {name} compute, {kernel}"] = (q, torch_only)
        del llm
    tmp = Path(tempfile.mkdtemp())
    for qtype in ("q8_0", "q4_0"):
        path = export_gguf(base, tmp / f"smollm-{qtype}.gguf", qtype)
        engines[f"llama.cpp {qtype.upper()} (our export)"] = (path, False)

    best: dict[str, tuple[float, float]] = {}
    for r in range(args.rounds):
        for label, (engine, torch_only) in engines.items():
            with pytorch_kernels_only() if torch_only else contextlib.nullcontext():
                if isinstance(engine, Path):
                    pre, dec = llama_cpp_bench(engine, ids, args.new, args.threads, 1)
                else:
                    res = bench_model(engine, args.prompt, args.new, 1, 1)
                    pre, dec = res["prefill_tokens_per_s"], res["decode_tokens_per_s"]
            old = best.get(label, (0.0, 0.0))
            best[label] = (max(old[0], pre), max(old[1], dec))
            print(f"round {r + 1}: {label}: prefill {pre:.1f}, decode {dec:.1f} tok/s", flush=True)
    rows = []
    for label, (engine, _) in engines.items():
        if isinstance(engine, Path):
            rows.append((label, *best[label], engine.stat().st_size, None))
        else:
            qb = sum(m.nbytes for m in engine.model.modules() if isinstance(m, QuantLinear))
            rows.append((label, *best[label], engine.model.weight_bytes(), qb or None))

    greedy = []
    for qtype in ("q8_0", "q4_0"):
        path = engines[f"llama.cpp {qtype.upper()} (our export)"][0]
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
          f"best of {args.rounds} interleaved rounds, model smollm2-135m\n")  # fmt: skip
    print(
        "| engine / weights | prefill tok/s | decode tok/s | decode vs llamalab bf16 | weight bytes in memory "
        "(file for llama.cpp) | quantized linear bytes |"
    )
    print("|---|---|---|---|---|---|")
    bf16 = best["llamalab bf16"][1]
    for label, pre, dec, wb, qb in rows:
        qbytes = "" if qb is None else f"{qb / 1e6:.1f} MB"
        print(f"| {label} | {pre:.1f} | {dec:.1f} | {dec / bf16:.2f}x | {wb / 1e6:.1f} MB | {qbytes} |")
    print(
        "\n| GGUF | identical greedy prefix (llama.cpp vs llamalab, same file) | our argmax = llama.cpp's token "
        "(teacher-forced) | llamalab text | llama.cpp text |"
    )
    print("|---|---|---|---|---|")
    for qtype, same, n, agree, ta, tb in greedy:
        print(f"| {qtype.upper()} | {same}/{n} | {agree}/{n} | {ta!r} | {tb!r} |")


if __name__ == "__main__":
    main()
