"""`llamalab eval ppl` throughput against transformers (and llama.cpp) on the same text, in the same run.

Same text (the shipped Alice text), same non-overlapping windows (GPTQ protocol), same thread count, batch 1.
Each system computes the full perplexity: forward pass, log-softmax and the NLL of every predicted token.
llamalab runs the embedded SmolLM2-135M GGUF dequantized; transformers runs the dense HF checkpoint that
`llamalab convert` writes from it (same numbers: the parity tests hold them to 1e-5); llama.cpp runs the GGUF
as stored (Q4_1 weights, so its perplexity differs a little) with all logits kept. Every system gets one
untimed warm-up window; the timed figure is the best of `--repeats` full passes.

    python benchmarks/eval_ppl.py [--threads 2] [--seq-len 1024] [--windows 4] [--dtypes fp32,bf16] [--no-write]

Prints a markdown table and writes it, with the command, into the eval_ppl section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best seconds, result) over `repeats` calls."""
    best, result = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def ours(
    ids: list[int], seq_len: int, windows: int, dtype: str, threads: int, repeats: int, chunk: int | None
):
    from llamalab.eval.perplexity import perplexity
    from llamalab.model_options import ModelOptions, load_model

    llm = load_model(ModelOptions(dtype=dtype, threads=threads))
    perplexity(llm, ids, seq_len, max_windows=1, chunk_size=chunk, progress=False)  # warm-up
    seconds, r = timed(
        lambda: perplexity(llm, ids, seq_len, max_windows=windows, chunk_size=chunk, progress=False), repeats
    )
    return seconds, r.ppl


def transformers_ppl(hf_dir: Path, ids: list[int], seq_len: int, windows: int, dtype: str, repeats: int):
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
    stream = torch.tensor(ids)

    def run(k: int) -> float:
        nll, n = 0.0, 0
        with torch.inference_mode():
            for i in range(k):
                w = stream[None, i * seq_len : (i + 1) * seq_len]
                nll += float(model(w, labels=w).loss) * (seq_len - 1)
                n += seq_len - 1
        return math.exp(nll / n)

    run(1)
    return timed(lambda: run(windows), repeats)


def llama_cpp_ppl(gguf: Path, ids: list[int], seq_len: int, windows: int, threads: int, repeats: int):
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llamalab import llama_cpp_peer

    llama_cpp = llama_cpp_peer.load()

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, n_threads=threads,
        n_threads_batch=threads, logits_all=True, verbose=False,
    )  # fmt: skip

    def run(k: int) -> float:
        nll, n = 0.0, 0
        for i in range(k):
            w = ids[i * seq_len : (i + 1) * seq_len]
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(llm.scores[: seq_len - 1].copy())
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
            n += seq_len - 1
        return math.exp(nll / n)

    run(1)
    return timed(lambda: run(windows), repeats)


def llama_cpp_child(args) -> None:
    """Run only the llama.cpp measurement and print it as JSON (in a child, so a crash cannot end the run)."""
    import json

    import llamalab
    from llamalab.data import sample_text
    from llamalab.io.registry import resolve_alias
    from llamalab.io.tokenizer import Tokenizer  # noqa: F401  (the same ids as the parent: llamalab's tokenizer)

    ids = llamalab.load("smollm2-135m").encode(sample_text())
    out = llama_cpp_ppl(
        resolve_alias("smollm2-135m"), ids, args.seq_len, args.windows, args.threads, args.repeats
    )
    print(json.dumps(None if out is None else {"seconds": out[0], "ppl": out[1]}))


def llama_cpp_in_child(args) -> tuple[tuple[float, float] | None, str]:
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--llama-cpp-child", "--threads", str(args.threads), "--seq-len",
           str(args.seq_len), "--windows", str(args.windows), "--repeats", str(args.repeats)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"not measured: llama-cpp-python exited with status {proc.returncode} on this machine"
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data is None:
        return None, "not measured: llama-cpp-python is not installed"
    return (data["seconds"], data["ppl"]), ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--dtypes", default="fp32", help="Comma-separated: fp32, bf16.")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--llama-cpp-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.llama_cpp_child:
        return llama_cpp_child(args)

    import llamalab
    from llamalab.convert import convert_to_hf
    from llamalab.data import sample_text

    tok_llm = llamalab.load("smollm2-135m")
    ids = tok_llm.encode(sample_text())
    del tok_llm
    n_tokens = args.windows * args.seq_len
    rows = []  # (system, dtype, ppl, tokens/s, transformers tokens/s of that dtype)
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_hf("smollm2-135m", Path(tmp) / "hf", "fp32")
        for dtype in args.dtypes.split(","):
            s, ppl_hf = transformers_ppl(
                Path(tmp) / "hf", ids, args.seq_len, args.windows, dtype, args.repeats
            )
            ref = n_tokens / s
            s, ppl = ours(ids, args.seq_len, args.windows, dtype, args.threads, args.repeats, None)
            rows.append(("llamalab `eval ppl`", dtype, ppl, n_tokens / s, ref))
            s, ppl = ours(ids, args.seq_len, args.windows, dtype, args.threads, args.repeats, 32)
            rows.append(
                ("llamalab `eval ppl --chunk-size 32` (dense KV cache)", dtype, ppl, n_tokens / s, ref)
            )
            rows.append(("transformers (`labels=` loss)", dtype, ppl_hf, ref, ref))
    cpp, cpp_note = llama_cpp_in_child(args)
    if cpp is not None:
        ref = next(r[4] for r in rows if r[1] == "fp32") if any(r[1] == "fp32" for r in rows) else rows[0][4]
        rows.append(
            ("llama.cpp (llama-cpp-python, `logits_all`)", "Q4_1 weights", cpp[1], n_tokens / cpp[0], ref)
        )

    import transformers

    lines = [
        f"Perplexity throughput, SmolLM2-135M, Alice text, {args.windows} non-overlapping windows of "
        f"{args.seq_len} tokens, batch 1, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        "| system | dtype | ppl | tokens/s | vs transformers (same dtype; fp32 for llama.cpp) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {dt} | {ppl:.4f} | {tps:.0f} | {tps / ref:.2f}x |" for name, dt, ppl, tps, ref in rows
    ]
    if cpp_note:
        lines += ["", f"llama.cpp: {cpp_note}"]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        cmd = "python benchmarks/eval_ppl.py " + " ".join(sys.argv[1:])
        write_section("eval_ppl", f"Command: `{cmd.strip()}`\n\n{table}")
        print("wrote the eval_ppl section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
