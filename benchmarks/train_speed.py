"""Training speed and peak memory of llamalab against Hugging Face transformers + peft (and TRL for DPO), in the
same run, on the same weights, the same data, the same batch and sequence length.

Cases (the default model, SmolLM2-135M, as the dense fp32 HF checkpoint `llamalab convert` writes, so both
sides start from identical weights):

- `full`: full fine-tuning, fp32, AdamW over every parameter.
- `lora`: LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down, fp32.
- `qlora`: the same LoRA over an NF4 base with double quantization and bf16 compute (ours: `quant/nf4.py`,
  kept packed; the peer: bitsandbytes `Linear4bit` through transformers' `BitsAndBytesConfig`, on its CPU
  backend, which is what `pip install bitsandbytes` gives on a machine without a GPU).
- `dpo`: DPO (beta 0.1, reference log-probabilities computed once before training) with LoRA r=16 on
  q/k/v/o over the first `--dpo-pairs` of the recipe's preference pairs (recipes/data/preferences.jsonl;
  a subset, so that the reference pass before training stays short); the peer is TRL's
  `DPOTrainer` with `precompute_ref_log_probs`. Reported in pairs/s: TRL pads a batch to its longest
  sequence, llamalab to `seq_len`, so tokens/s would not compare the same work.

Causal-LM cases train on the shipped text's training part as one document, cut into rows of `--seq-len`
tokens, `--batch` rows per step (the rows llamalab's data pipeline makes, fed to both sides). AdamW (betas
0.9/0.95, no weight decay), gradient clipping at 1.0, constant learning rate, no activation checkpointing on
either side. Each (case, system) runs in its own process: `--warmup` steps, then `--steps` timed steps
(median step time), peak resident memory (ru_maxrss) after the last step. The first step's loss is printed
for both: equal losses show both sides compute the same thing.

    python benchmarks/train_speed.py --threads 2 --cases full,lora,qlora,dpo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("full", "lora", "qlora", "dpo")
SYSTEMS = ("llamalab", "peer")
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR = 1e-4


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def text_file(tmp: Path) -> Path:
    """The shipped text's training part as one document (one .txt file is one document)."""
    from llamalab.data import alice_split

    path = tmp / "alice-train.txt"
    path.write_text(alice_split()[0])
    return path


# --- llamalab ---------------------------------------------------------------------------------------------


def run_llamalab(case: str, args, hf_dir: Path, tmp: Path) -> dict:
    from llamalab.train import load_config, train

    lora = ATTENTION if case == "dpo" else ALL_LINEARS
    raw = {
        "model": str(hf_dir),
        "objective": "dpo" if case == "dpo" else "clm",
        "data": {"train": [{"source": args.pairs if case == "dpo" else str(text_file(tmp))}],
                 "eval": None, "seq_len": args.dpo_seq_len if case == "dpo" else args.seq_len},
        "batch": {"micro": args.batch, "accumulate": 1},
        "steps": args.warmup + args.steps,
        "optim": {"lr": LR, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"warmup": 0, "decay": "constant"},
        "checkpoint": {"every": 10**6, "keep_last": 1},
        "eval": {"every": 0},
        "out": str(tmp / "run"),
        "threads": args.threads,
    }  # fmt: skip
    if case == "dpo":
        raw["dpo"] = {"beta": 0.1, "max_prompt_tokens": 128}
    if case != "full":
        raw["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0 if case == "dpo" else 0.05, "targets": lora}
    if case == "qlora":
        raw["qlora"] = {"block_size": 64, "double_quant": True}
        raw["autocast"] = "bf16"
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in raw.items()])
    records = []

    def on_step(record: dict) -> None:
        record["peak_mb"] = peak_mb()
        record["time"] = time.perf_counter()
        records.append(record)

    train(cfg, on_step=on_step)
    times = [b["time"] - a["time"] for a, b in zip(records[args.warmup - 1 :], records[args.warmup :])]
    return {"step_s": times, "first_loss": records[0]["loss"], "peak_mb": records[-1]["peak_mb"],
            "tokens_per_step": None if case == "dpo" else args.batch * args.seq_len}  # fmt: skip


# --- transformers + peft (+ TRL) -----------------------------------------------------------------------


def peer_model(case: str, hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if case != "qlora":
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    else:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), quantization_config=q, device_map="cpu")
    if case in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_LINEARS)
        )
    return model


def run_peer_lm(case: str, args, hf_dir: Path, tmp: Path) -> dict:
    """A plain PyTorch loop over the transformers model: the peer at its leanest (no Trainer overhead)."""
    import torch

    torch.set_num_threads(args.threads)
    batches = torch.load(args.rows)
    model = peer_model(case, hf_dir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "qlora")
    stamps, losses = [], []
    for batch in batches:
        with autocast:
            # The rows' labels are already the next tokens: `shift_labels` tells transformers' loss so.
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        stamps.append(time.perf_counter())
    times = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
    return {"step_s": times, "first_loss": losses[0], "peak_mb": peak_mb(),
            "tokens_per_step": args.batch * args.seq_len}  # fmt: skip


def run_peer_dpo(args, hf_dir: Path, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    rows = [json.loads(x) for x in Path(args.pairs).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])  # fmt: skip
    stamps, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.batch, learning_rate=LR,
                       adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                       lr_scheduler_type="constant", max_steps=args.warmup + args.steps, beta=0.1,
                       max_length=args.dpo_seq_len, precompute_ref_log_probs=True, logging_steps=1,
                       save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0)  # fmt: skip
    trainer = DPOTrainer(
        model=str(hf_dir),
        args=config,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(hf_dir),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTENTION),
        callbacks=[Clock()],
    )
    trainer.train()
    times = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
    return {"step_s": times, "first_loss": losses[0] if losses else None, "peak_mb": peak_mb(),
            "tokens_per_step": None}  # fmt: skip


# --- driver -----------------------------------------------------------------------------------------------


def pairs_file(args, tmp: Path) -> Path:
    """The first `--dpo-pairs` preference pairs of the DPO recipe, as both sides read them."""
    lines = (ROOT / "recipes/data/preferences.jsonl").read_text().splitlines()[: args.dpo_pairs]
    path = tmp / "pairs.jsonl"
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def lm_batches(args, tmp: Path) -> Path:
    """The causal-LM steps' batches exactly as llamalab's training data makes them (seed 0), saved for the
    peer's processes (built here, so that the tokenizer's memory is not counted in the peer's peak)."""
    import torch

    import llamalab
    from llamalab.train.config import DataConfig, SourceConfig
    from llamalab.train.data import build_mixture, collate

    tokenizer = llamalab.load(str(args.hf_dir), dtype="fp32").tokenizer
    data = build_mixture(DataConfig([SourceConfig(str(text_file(tmp)))], eval=None, seq_len=args.seq_len),
                         "clm", tokenizer, None, 0)  # fmt: skip
    path = tmp / "rows.pt"
    torch.save([collate(data.next_rows(args.batch)) for _ in range(args.warmup + args.steps)], path)
    return path


def worker(case: str, system: str, args) -> None:
    hf_dir = Path(args.hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if system == "llamalab":
            result = run_llamalab(case, args, hf_dir, Path(tmp))
        elif case == "dpo":
            result = run_peer_dpo(args, hf_dir, Path(tmp))
        else:
            result = run_peer_lm(case, args, hf_dir, Path(tmp))
    print("RESULT " + json.dumps(result), flush=True)


def measure(case: str, system: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"{case}:{system}",
        "--hf-dir",
        str(args.hf_dir),
        "--rows",
        str(args.rows),
        "--pairs",
        str(args.pairs),
    ]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("threads", "batch", "seq_len", "dpo_seq_len",
                                                                   "dpo_pairs", "warmup", "steps")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[-300:]}
    r = json.loads(lines[-1][7:])
    r["median_step_s"] = statistics.median(r["step_s"])
    return r


def speed(r: dict, case: str, args) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    if case == "dpo":
        return f"{args.batch / r['median_step_s']:.2f} pairs/s"
    return f"{r['tokens_per_step'] / r['median_step_s']:.0f} tok/s"


def table(results: dict, args) -> str:
    import peft
    import torch
    import transformers
    import trl

    from llamalab import __version__

    lines = [
        f"SmolLM2-135M (dense fp32 HF checkpoint), {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}, llamalab {__version__}. Causal-LM cases: {args.batch} rows x {args.seq_len} tokens "
        f"per step; DPO: {args.batch} pairs per step, sequences up to {args.dpo_seq_len} tokens. Median of "
        f"{args.steps} steps after {args.warmup} warm-up steps; peak RSS of the whole process (model, optimizer, "
        "activations, Python and libraries).",
        "",
        "| case | llamalab | transformers + peft / TRL | speed ratio | peak RSS llamalab | peak RSS peer | first loss (ours / peer) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for case in args.cases:
        ours, peer = results[case]["llamalab"], results[case]["peer"]

        ratio = (
            "-"
            if "error" in ours or "error" in peer
            else f"{peer['median_step_s'] / ours['median_step_s']:.2f}x"
        )
        mem = [f"{r['peak_mb']:.0f} MB" if "peak_mb" in r else "-" for r in (ours, peer)]
        loss = [f"{r['first_loss']:.4f}" if r.get("first_loss") is not None else "-" for r in (ours, peer)]
        lines.append(
            f"| {case} | {speed(ours, case, args)} | {speed(peer, case, args)} | {ratio} | {mem[0]} | {mem[1]} | {loss[0]} / {loss[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="rows (pairs for DPO) per optimizer step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dpo-seq-len", type=int, default=192)
    ap.add_argument("--dpo-pairs", type=int, default=48, help="preference pairs the DPO case reads")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        case, system = args.worker.split(":")
        worker(case, system, args)
        return
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; use {', '.join(CASES)}")
    from llamalab.convert import convert_to_hf

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.hf_dir = Path(tmp) / "smollm2-135m-hf"
        convert_to_hf("smollm2-135m", args.hf_dir, "fp32")
        args.rows = lm_batches(args, Path(tmp))
        args.pairs = pairs_file(args, Path(tmp))
        for case in args.cases:
            for system in SYSTEMS:
                print(f"{case} / {system} ...", flush=True)
                results.setdefault(case, {})[system] = r = measure(case, system, args)
                print("  " + json.dumps({k: v for k, v in r.items() if k != "step_s"}), flush=True)
    body = table(results, args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from sections import write_section

        write_section("train-speed", "## Training speed: `benchmarks/train_speed.py`\n\n" + body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
