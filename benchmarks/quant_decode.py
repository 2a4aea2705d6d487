"""Decode speed of weight-quantized models against llama.cpp on the same weights, in one run.

Engines, the default model (smollm2-135m) throughout:
  * llamalab bf16 (the dense reference);
  * RTN int8 per channel, int4 g64 and symmetric int4 g64 (as Q4_0 is symmetric: every zero is 8, so the
    kernels subtract it once per chunk instead of a second dot product per row; the weights' values do not
    change a kernel's speed otherwise), the tied head quantized the same way (as llama.cpp's export quantizes
    token_embd), bf16 activations, on the native
    kernels' integer path (8-bit activations, AVX512-VNNI) and on the exact path (each weight dequantized to
    fp32 in registers); NF4 (its head stays bf16; exact path only);
  * GGUF files run as stored (`--dtype stored`): our Q8_0 and Q4_0 exports and the embedded default model's
    own Q4_1 file, on both paths;
  * llama.cpp (llama-cpp-python) on the same three files.
The machine's speed drifts (a VM), so every engine runs once per round, in turn, for `--rounds` rounds, and
each keeps its best. Each row's figure is also given as a share of the read-bandwidth ceiling for the bytes
it reads per token (bandwidth measured in the same run). At batch 1 it also compares greedy text and
teacher-forced argmax with llama.cpp on each file, for both paths. Prints markdown tables.

    .venv/bin/python benchmarks/quant_decode.py --threads 2 --prompt 128 --new 64 --rounds 3
    .venv/bin/python benchmarks/quant_decode.py --threads 2 --prompt 128 --new 32 --rounds 2 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
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


def read_bandwidth(threads: int) -> float:
    """The machine's read bandwidth in bytes/s now: the best of 5 sums over 512 MB of fp32 (PyTorch's
    vectorised reduction, `threads` threads), the ceiling a decode step that streams its weights can reach."""
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def quantize_head(llm, bits: int, group: int, sym: bool = False) -> None:
    """Give the model a quantized copy of its (tied) head, as llama.cpp's export quantizes token_embd: RTN."""
    from llamalab.model.modules import set_module
    from llamalab.quant.base import UniformQuantLinear
    from llamalab.quant.quantizer import group_affine

    w = llm.model.model.embed_tokens.weight.detach().float()
    head = UniformQuantLinear.from_codes(*group_affine(w, bits, group, sym), bits, group)
    set_module(llm.model, "lm_head", head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument(
        "--batch", type=int, default=1, help="sequences decoded together (llama.cpp: batch 1 only)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="every engine runs once per round; best kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llamalab
    from llamalab import kernels
    from llamalab.bench import bench_model, bench_tokens, decode_argmax, decode_bytes_per_token
    from llamalab.io.gguf_export import export_gguf
    from llamalab.io.load import resolve
    from llamalab.quant import prepare_model, quantize_model

    base = llamalab.load("smollm2-135m", dtype="fp32")
    ids = bench_tokens(base, args.prompt)
    # label -> (model or GGUF path, exact path)
    engines: dict[str, tuple] = {"llamalab bf16": (llamalab.load("smollm2-135m", dtype="bf16"), False)}
    rtn = (
        ("int8 per channel", 8, -1, False),
        ("int4 g64", 4, 64, False),
        ("int4 g64 symmetric", 4, 64, True),
    )
    for label, bits, group, sym in rtn:
        llm = copy.copy(base)
        llm.model = copy.deepcopy(base.model)
        quantize_model(llm, "rtn", bits, group, progress=False, sym=sym)
        quantize_head(llm, bits, group, sym)
        llm.model = prepare_model(llm.model.to(torch.bfloat16))
        for exact in (False, True):
            path = "exact fp32 dequantization" if exact else "8-bit activations, VNNI"
            engines[f"llamalab {label} (head too), bf16, {path}"] = (llm, exact)
    nf4 = copy.copy(base)
    nf4.model = copy.deepcopy(base.model)
    quantize_model(nf4, "nf4", 4, 64, progress=False)
    nf4.model = prepare_model(nf4.model.to(torch.bfloat16))
    engines["llamalab NF4 (bf16 head), bf16, exact"] = (nf4, True)
    tmp = Path(tempfile.mkdtemp())
    files = {
        qtype.upper(): export_gguf(base, tmp / f"smollm-{qtype}.gguf", qtype) for qtype in ("q8_0", "q4_0")
    }
    files["Q4_1"] = resolve("smollm2-135m")  # the embedded default model, as shipped
    for qtype, path in files.items():
        origin = "the default model's file" if qtype == "Q4_1" else "our export"
        stored = llamalab.load(str(path), dtype="stored")
        for exact in (False, True):
            way = "exact fp32 dequantization" if exact else "8-bit activations, VNNI"
            engines[f"llamalab {qtype} as stored ({origin}), {way}"] = (stored, exact)
        engines[f"llama.cpp {qtype} ({origin})"] = (path, False)

    bandwidth = read_bandwidth(args.threads)
    best: dict[str, tuple[float, float]] = {}
    for r in range(args.rounds):
        for label, (engine, exact) in engines.items():
            if isinstance(engine, Path):
                if args.batch > 1:
                    continue
                pre, dec = llama_cpp_bench(engine, ids, args.new, args.threads, 1)
            else:
                with kernels.exact_quant() if exact else contextlib.nullcontext():
                    res = bench_model(engine, args.prompt, args.new, args.batch, 1)
                pre, dec = res["prefill_tokens_per_s"], res["decode_tokens_per_s"]
            old = best.get(label, (0.0, 0.0))
            best[label] = (max(old[0], pre), max(old[1], dec))
            print(f"round {r + 1}: {label}: prefill {pre:.1f}, decode {dec:.1f} tok/s", flush=True)
    bandwidth = max(bandwidth, read_bandwidth(args.threads))

    print(f"\nthreads={args.threads}, batch={args.batch}, prompt={args.prompt} tokens, decode {args.new} tokens, "
          f"best of {args.rounds} interleaved rounds, model smollm2-135m; read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(sum over 512 MB, {args.threads} threads)\n")  # fmt: skip
    print("| engine / weights | prefill tok/s | decode tok/s | vs llama.cpp, same format | bytes read per token "
          "| % of the bandwidth ceiling |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    peers = {q: best.get(f"llama.cpp {q} ({'the default model' + chr(39) + 's file' if q == 'Q4_1' else 'our export'})")
             for q in files}  # fmt: skip
    for label, (engine, _) in engines.items():
        if label not in best:
            continue
        pre, dec = best[label]
        per_token = (
            engine.stat().st_size if isinstance(engine, Path) else decode_bytes_per_token(engine.model)
        )
        fmt = next((q for q in files if q in label), None)
        if "int4" in label:
            fmt = "Q4_0"
        elif "int8" in label:
            fmt = "Q8_0"
        peer = peers.get(fmt) if fmt else None
        ratio = f"{dec / peer[1]:.2f}x ({fmt})" if peer and not isinstance(engine, Path) else ""
        ceiling = bandwidth / per_token * args.batch
        print(
            f"| {label} | {pre:.1f} | {dec:.1f} | {ratio} | {per_token / 1e6:.1f} MB | {100 * dec / ceiling:.0f}% |"
        )

    if args.batch > 1:
        return
    print("\n| GGUF | llamalab path | identical greedy prefix (llama.cpp vs llamalab, same file) | our argmax = "
          "llama.cpp's token (teacher-forced) |")  # fmt: skip
    print("|---|---|---|---|")
    for qtype, path in files.items():
        ours = llamalab.load(str(path), dtype="stored")
        p = ours.encode(PROMPT)
        b = llama_cpp_greedy(path, p, 32)
        for exact in (False, True):
            with kernels.exact_quant() if exact else contextlib.nullcontext():
                a = ours.generate_sequences([p], max_new_tokens=32)[0].output_ids
                top = decode_argmax(ours, p, b)
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            agree = sum(int(x == y) for x, y in zip(top, b))
            print(f"| {qtype} | {'exact' if exact else 'VNNI'} | {same}/{len(a)} | {agree}/{len(b)} |")


if __name__ == "__main__":
    main()
