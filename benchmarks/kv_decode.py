"""Decode speed and memory of every KV-cache method at 1K, 4K and 8K tokens of context (issue 12), against
the dense cache and, as the outside peer, llama.cpp's own KV-cache types (f16, q8_0, q4_0) in the same run.

llamalab: the default model in bf16, one process per (method, context) so that each peak is its own. In it
`llamalab.bench.bench_model` prefills a prompt of real text (context - new tokens, 512-token chunks through the
cache), then decodes `new` tokens greedily, one warm-up round and `--repeats` timed ones (best reported).
Memory: the cache's bytes measured from its tensors, and the peak resident memory the rounds added above the
loaded model (/proc/self/clear_refs resets the high-water mark: the cache, prefill activations and every
transient, such as a dequantized copy of a layer's past).

llama.cpp (llama-cpp-python): the same GGUF as stored (Q4_1 weights: its absolute speed is not comparable to
our bf16, its ratio to its own f16 cache is), flash attention on (llama.cpp needs it for a quantized V cache),
`type_k = type_v` = f16, q8_0 or q4_0. Its figure is decode tokens/s after the same prompt.

AQUA-KV needs predictors: `--predictors FILE` (from `llamalab kv calibrate`), else they are fitted first with
the lab's calibration (8 windows of 1024 tokens of the book, 2 bits), which takes a few minutes.

    python benchmarks/kv_decode.py [--threads 2] [--contexts 1024,4096,8192] [--new-tokens 32] [--no-write]

Prints a markdown table and replaces the `kv_decode` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]

# label -> (method, bits); AQUA-KV's predictors are added when it runs
METHODS = {
    "dense": ("dense", None),
    "KIVI-4": ("kivi", 4),
    "KIVI-2": ("kivi", 2),
    "HIGGS-2 (no predictors)": ("higgs", 2),
    "AQUA-KV 2": ("aquakv", 2),
    "MiniCache": ("minicache", None),
    "MiniCache + KIVI-4": ("minicache", 4),
}
LLAMA_CPP_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids


def run_one(method: str, bits: float | None, predictors: str | None, context: int, new: int, repeats: int,
            threads: int) -> dict:  # fmt: skip
    """One (method, context) in this process: bench_model's figures."""
    import torch

    import llamalab
    from llamalab.bench import bench_model
    from llamalab.kv.registry import CacheSpec

    torch.set_num_threads(threads)
    spec = CacheSpec(method, bits, predictors=predictors if method == "aquakv" else None)
    llm = llamalab.load("smollm2-135m", dtype="bf16", kv=spec)
    return bench_model(llm, context - new, new, repeats=repeats)


def llama_cpp_one(context: int, new: int, type_id: int, threads: int, repeats: int) -> float:
    """llama.cpp's decode tokens/s after a prompt of context - new tokens, its KV cache of ggml type `type_id`."""
    from llamalab import llama_cpp_peer
    from llamalab.io.registry import resolve_alias

    Llama = llama_cpp_peer.load().Llama
    path = resolve_alias("smollm2-135m")
    ll = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context + 8, n_batch=512,
               flash_attn=True, type_k=type_id, type_v=type_id, verbose=False)  # fmt: skip
    import llamalab
    from llamalab.bench import bench_tokens

    ids = bench_tokens(llamalab.load("smollm2-135m", dtype="bf16"), context - new)
    best = 0.0
    for _ in range(repeats + 1):  # the first round warms up
        ll.reset()
        gen = ll.generate(ids, top_k=1, temp=0.0, reset=True)
        next(gen)
        t = time.perf_counter()
        for _ in range(new):
            next(gen)
        best = max(best, new / (time.perf_counter() - t))
        gen.close()
    return best


def fit_predictors(out: Path, threads: int) -> Path:
    """AQUA-KV 2-bit predictors for the default model, as the lab fits them (kv/calibration.py)."""
    import torch

    import llamalab
    from llamalab.kv.calibration import KVCalibration, fit_kv_parameters

    torch.set_num_threads(threads)
    cal = KVCalibration(method="aquakv", bits=2, nsamples=8, seq_len=1024)
    params = fit_kv_parameters(llamalab.load("smollm2-135m", dtype="fp32"), cal, progress=True)
    params.save(out)
    return out


def in_subprocess(args: list[str], script: str = __file__) -> dict:
    """Run `script` with `args` in a fresh process; the last line it prints, as JSON."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: dict, cpp: dict, contexts: list[int], threads: int, new: int) -> str:
    ks = [f"{c // 1024}K" for c in contexts]
    cpu = platform.processor() or platform.machine()
    lines = [
        f"SmolLM2-135M-Instruct, bf16 weights and keys/values, batch 1, {threads} threads ({cpu}, {os.cpu_count()} "
        f"CPUs), {new} new tokens after a prompt of real text filling the context; best of the timed rounds. "
        "`x dense`: decode tokens/s over the dense cache's in the same run. Cache MB: measured from the cache's "
        "tensors (allocated for the context). Peak MB: resident memory the prefill and decode added above the "
        "loaded model. Path: `native` = the native decode step reads the cache in place (dense, KIVI's packed "
        "codes); `pytorch` = the method's own Python attention (it rebuilds the past for each step).",
        "",
        "| KV cache | path | " + " | ".join(f"tok/s {k} (x dense)" for k in ks) + " | "
        + " | ".join(f"cache MB {k}" for k in ks) + " | " + " | ".join(f"peak MB {k}" for k in ks) + " |",
        "|---|---|" + "---|" * (3 * len(ks)),
    ]  # fmt: skip
    for label, by_ctx in rows.items():
        r = [by_ctx[c] for c in contexts]
        dense = [rows["dense"][c]["decode_tokens_per_s"] for c in contexts]
        speed = [
            f"{x['decode_tokens_per_s']:.1f} ({x['decode_tokens_per_s'] / d:.2f})" for x, d in zip(r, dense)
        ]
        path = r[-1]["decode_path"].split(" ")[0]
        lines.append(
            f"| {label} | {path} | " + " | ".join(speed) + " | "
            + " | ".join(f"{x['kv_cache_mb']:.1f}" for x in r) + " | "
            + " | ".join("-" if x["run_peak_mb"] is None else f"{x['run_peak_mb']:.0f}" for x in r) + " |"
        )  # fmt: skip
    if cpp:
        lines += [
            "",
            "llama.cpp in the same run (its Q4_1 weights as stored, flash attention, `type_k = type_v`): decode "
            "tokens/s, and over its own f16 cache.",
            "",
            "| llama.cpp KV type | " + " | ".join(f"tok/s {k} (x f16)" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for name, by_ctx in cpp.items():
            cells = [f"{by_ctx[c]:.1f} ({by_ctx[c] / cpp['f16'][c]:.2f})" for c in contexts]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up (best reported)")
    ap.add_argument("--methods", default=",".join(METHODS), help="labels to run (comma-separated)")
    ap.add_argument(
        "--predictors", help="AQUA-KV predictors (llamalab kv calibrate); default: fit them first"
    )
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "BITS", "CONTEXT"), help=argparse.SUPPRESS)
    ap.add_argument("--one-llama-cpp", nargs=2, metavar=("TYPE", "CONTEXT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # a child process: one measurement, one JSON line
        method, bits, context = a.one
        bits_v = None if bits == "-" else float(bits)
        r = run_one(method, bits_v, a.predictors, int(context), a.new_tokens, a.repeats, a.threads)
        print(json.dumps(r))
        return
    if a.one_llama_cpp:
        name, context = a.one_llama_cpp
        tps = llama_cpp_one(int(context), a.new_tokens, LLAMA_CPP_TYPES[name], a.threads, a.repeats)
        print(json.dumps({"decode_tokens_per_s": tps}))
        return
    contexts = [int(c) for c in a.contexts.split(",")]
    labels = [m.strip() for m in a.methods.split(",")]
    common = ["--threads", str(a.threads), "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        predictors = a.predictors
        if predictors is None and any(METHODS[m][0] == "aquakv" for m in labels):
            print("fitting AQUA-KV's predictors (2 bits) ...", file=sys.stderr)
            predictors = str(fit_predictors(Path(tmp) / "aquakv.pt", a.threads))
        rows: dict[str, dict[int, dict]] = {}
        for label in labels:
            method, bits = METHODS[label]
            for c in contexts:
                extra = ["--predictors", predictors] if method == "aquakv" else []
                r = in_subprocess(
                    ["--one", method, "-" if bits is None else str(bits), str(c), *common, *extra]
                )
                rows.setdefault(label, {})[c] = r
                print(f"{label} {c}: {r['decode_tokens_per_s']} tok/s ({r['decode_path']}), cache "
                      f"{r['kv_cache_mb']} MB, peak {r['run_peak_mb']} MB", file=sys.stderr)  # fmt: skip
    cpp: dict[str, dict[int, float]] = {}
    if not a.no_llama_cpp:
        for name in LLAMA_CPP_TYPES:
            for c in contexts:
                cpp.setdefault(name, {})[c] = in_subprocess(["--one-llama-cpp", name, str(c), *common])[
                    "decode_tokens_per_s"
                ]
                print(f"llama.cpp {name} {c}: {cpp[name][c]:.1f} tok/s", file=sys.stderr)
    body = table(rows, cpp, contexts, a.threads, a.new_tokens)
    print(body)
    if not a.no_write:
        write_section("kv_decode", body)


if __name__ == "__main__":
    main()
