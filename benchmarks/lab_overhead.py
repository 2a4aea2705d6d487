"""What the lab costs: one small grid through `llamalab lab run` against the same evaluations called directly.

Three cells on the default model (its own fp32 weights, RTN 8-bit per channel, RTN 4-bit g64), each with
perplexity (held-out Alice, 4 windows of 512 tokens) and the held-out cloze task (40 questions), at the
same thread count, in one run of this script:

- **direct**: one Python process loads the model, quantizes it in place where the cell says so, and calls
  `perplexity` and `evaluate_choice`, cell after cell (what a hand-written loop does);
- **lab inline** (`--workers 0`): the same cells through the lab in this process: grid expansion, the
  database, each quantized model saved once as an artifact and loaded back, one transaction per cell;
- **lab, 1 worker** (`--workers 1`, the default): as inline, but every artifact build and every cell in a
  fresh worker process (start-up and imports each time; what isolates cells and makes their peak memory
  their own).

The lab's numbers are checked against the direct ones (largest relative perplexity difference printed).

    python benchmarks/lab_overhead.py [--threads 2] [--no-write]

Prints a markdown table and writes it, with the command and the machine's load, into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from sections import write_section

SEQ_LEN, WINDOWS, QUESTIONS = 512, 4, 40
CELLS = [("base", None), ("rtn-w8", ("rtn", 8, -1)), ("rtn-w4-g64", ("rtn", 4, 64))]
GRID = """
name: lab_overhead
options: {{model: smollm2-135m, dtype: fp32, threads: {threads}}}
include:
  - {{label: base, quant.method: none}}
  - {{label: rtn-w8, quant.method: rtn, quant.bits: 8, quant.group_size: -1}}
  - {{label: rtn-w4-g64, quant.method: rtn, quant.bits: 4, quant.group_size: 64}}
evals:
  ppl: {{data: alice_heldout, seq_len: {seq_len}, max_windows: {windows}}}
  choice: {{task: alice_cloze_heldout, limit: {questions}}}
"""


def direct(threads: int) -> tuple[float, dict[str, float]]:
    import llamalab
    from llamalab.eval.choice import cloze_docs, evaluate_choice
    from llamalab.eval.perplexity import perplexity
    from llamalab.quant import quantize_model
    from llamalab.quant.calib import alice_split

    t0 = time.perf_counter()
    out = {}
    for label, quant in CELLS:
        llm = llamalab.load("smollm2-135m", dtype="fp32", threads=threads)
        if quant:
            quantize_model(llm, *quant, progress=False)
        held_out = alice_split()[1]
        r = perplexity(
            llm, llm.encode(held_out, add_special_tokens=False), SEQ_LEN, max_windows=WINDOWS, progress=False
        )
        evaluate_choice(llm, cloze_docs(held_out, n=1000)[:QUESTIONS], progress=False)
        out[label] = r.ppl
    return time.perf_counter() - t0, out


def through_lab(threads: int, workers: int) -> tuple[float, dict[str, float]]:
    from llamalab.lab.grid import load_grid
    from llamalab.lab.results import load_rows
    from llamalab.lab.runner import run_grid
    from llamalab.lab.store import Store

    folder = Path(tempfile.mkdtemp(prefix="lab_overhead_"))
    path = folder / "grid.yaml"
    path.write_text(
        textwrap.dedent(GRID).format(threads=threads, seq_len=SEQ_LEN, windows=WINDOWS, questions=QUESTIONS)
    )
    t0 = time.perf_counter()
    grid = load_grid(path)
    summary = run_grid(grid, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    if summary.failed:
        sys.exit(f"lab run failed: {summary.errors}")
    return seconds, {r.label: r.get("ppl.ppl") for r in load_rows(Store(grid.default_db_url()), grid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llamalab

    llamalab.load("smollm2-135m").generate("warm up", max_new_tokens=2)  # page cache, native kernels
    load_before = os.getloadavg()
    results = [("direct calls, one process", *direct(args.threads))]
    results.append(("lab, --workers 0 (inline)", *through_lab(args.threads, 0)))
    results.append(("lab, --workers 1 (a process per task)", *through_lab(args.threads, 1)))
    load_after = os.getloadavg()
    base_s, base_ppl = results[0][1], results[0][2]
    lines = [
        f"Command: `python benchmarks/lab_overhead.py --threads {args.threads}`; model smollm2-135m fp32, "
        f"{args.threads} threads per cell, {len(CELLS)} cells (base, RTN w8, RTN w4 g64) x (perplexity "
        f"{WINDOWS} x {SEQ_LEN} tokens + {QUESTIONS} cloze questions); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
        "(a machine shared with other jobs: the seconds move with that load, the ratios less).",
        "",
        "| how | wall s | vs direct | overhead per cell s | max rel. ppl difference vs direct |",
        "|---|---|---|---|---|",
    ]
    for name, seconds, ppl in results:
        diff = max(abs(ppl[k] - base_ppl[k]) / base_ppl[k] for k in base_ppl)
        lines.append(
            f"| {name} | {seconds:.1f} | {seconds / base_s:.2f}x | "
            f"{(seconds - base_s) / len(CELLS):+.1f} | {diff:.1e} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("lab_overhead", body)


if __name__ == "__main__":
    main()
