"""Time to quantize the default model with each method (2 threads), with the study's calibration settings.

Each method runs through `llamalab.quant.quantize_model` exactly as `llamalab quantize` and the
study's grid (`experiments/quant_study.yaml`, through the lab) run it; the table reports wall seconds and stored bits per weight.

    .venv/bin/python benchmarks/quant_time.py --threads 2
    .venv/bin/python benchmarks/quant_time.py --methods gptq awq
"""

from __future__ import annotations

import argparse
import copy

import torch

# method, bits, group, calibration (nsamples, seq_len) or None, options
RUNS = {
    "rtn": (4, 64, None, {}),
    "nf4": (4, 64, None, {}),
    "gptq": (4, 64, (32, 512), {}),
    "awq": (4, 64, (16, 512), {"search_samples": 4}),
    "quip": (3, -1, (32, 512), {}),
    "slimllm": (2, 64, (32, 512), {}),
    "dbllm": (2, 64, (32, 512), {}),
    "smoothquant": (8, -1, (64, 512), {"act_bits": 8}),
    "pbllm": (1.7, 128, (32, 512), {}),
    "billm": (1.1, 128, (32, 512), {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(RUNS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llamalab
    from llamalab.quant import CalibConfig, quantize_model

    base = llamalab.load("smollm2-135m")
    print(
        f"threads={args.threads}, model smollm2-135m (30 blocks, 210 linears), calibration from the shipped text\n"
    )
    print("| method | bits | group | calibration | seconds | stored bits/weight |")
    print("|---|---|---|---|---|---|")
    for name in args.methods:
        bits, group, calib, opts = RUNS[name]
        llm = copy.copy(base)
        llm.model = copy.deepcopy(base.model)
        cal = CalibConfig("alice", *calib, 0) if calib else None
        r = quantize_model(llm, name, bits, group, cal, progress=False, **opts)
        c = f"{calib[0]} x {calib[1]}" if calib else "-"
        print(
            f"| {name} | {bits:g} | {group} | {c} | {r.seconds:.0f} | {r.bits_per_weight:.2f} |", flush=True
        )


if __name__ == "__main__":
    main()
