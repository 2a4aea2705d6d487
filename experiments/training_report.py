"""Tables and plots of docs/results/training.md from the runs' metrics and the held-out evaluations.

Inputs (the run directories are not kept in git, so their `metrics.jsonl` is copied beside the report):

- `runs/pretrain-tiny-s{0,1,2}`, `runs/sft-{lora,qlora,irqlora}`, `runs/dpo-lora`: the runs of the recipes
  (commands in docs/results/training.md), copied to `docs/results/training/<run>.metrics.jsonl`;
- `docs/results/training/ngram.json` (experiments/ngram_baseline.py), `sft_eval.json`, `icq.json` and
  `dpo_eval.json` (experiments/training_eval.py).

Each table is written between `<!-- NAME:begin -->` / `<!-- NAME:end -->` markers of the page, so the prose
around them stays. Seeds are summarised as mean ± sample standard deviation, rates as k/n with a binomial
standard error.

    python experiments/training_report.py [--runs runs]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sections import write_section  # noqa: E402

OUT = ROOT / "docs" / "results"
DATA = OUT / "training"
PAGE = OUT / "training.md"
PRETRAIN = [f"pretrain-tiny-s{s}" for s in range(3)]
SFT = {"base": "SmolLM2-135M-Instruct (no fine-tuning)", "nf4": "NF4 base (no fine-tuning)",
       "nf4-icq": "NF4 + ICQ base (no fine-tuning)", "lora": "LoRA (fp32 base)", "qlora": "QLoRA (NF4 base)",
       "irqlora": "IR-QLoRA (NF4 + ICQ base, IEC)"}  # fmt: skip
# The low-bit LLaMA3 study (arXiv 2404.14047), LLaMA3-8B LoRA-FT on Alpaca: 5-shot MMLU average.
PAPER_MMLU = {
    "base": "64.8 (FP16)",
    "nf4": "62.5",
    "nf4-icq": "-",
    "lora": "-",
    "qlora": "56.7",
    "irqlora": "57.2",
}


def metrics(name: str) -> list[dict]:
    path = DATA / f"{name}.metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def copy_runs(runs: Path) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name in PRETRAIN + ["sft-lora", "sft-qlora", "sft-irqlora", "dpo-lora"]:
        src = runs / name / "metrics.jsonl"
        if src.exists():
            shutil.copyfile(src, DATA / f"{name}.metrics.jsonl")


def mean_sd(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.1f}" if xs else "-"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def rate(m: dict) -> str:
    return f"{m['k']}/{m['n']} ({100 * m['p']:.0f} ± {100 * m['se']:.0f}%)"


# --- pretraining -----------------------------------------------------------------------------------------


def pretrain_table() -> str:
    runs = {name: metrics(name) for name in PRETRAIN}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return "(no pretraining run yet)"
    evals = {k: [r for r in v if "eval_ppl" in r] for k, v in runs.items()}
    first = [e[0]["eval_ppl"] for e in evals.values()]
    last = [e[-1]["eval_ppl"] for e in evals.values()]
    best = [min(r["eval_ppl"] for r in e) for e in evals.values()]
    train_ppl = [math.exp(statistics.mean(r["loss"] for r in v[-10:])) for v in runs.values()]
    steps = next(iter(evals.values()))[-1]["step"]
    tokens = next(iter(runs.values()))[-1]["tokens"]
    ngram = json.loads((DATA / "ngram.json").read_text())
    rows = [
        "| model | held-out perplexity | note |",
        "|---|---|---|",
        f"| tiny LLaMA after {evals[next(iter(evals))][0]['step']} steps | {mean_sd(first)} | {len(runs)} seeds |",
        f"| tiny LLaMA after {steps} steps ({tokens / 1e3:.0f}k tokens) | **{mean_sd(last)}** | {len(runs)} seeds; "
        f"best along the run {mean_sd(best)}; training perplexity (last 10 steps) {mean_sd(train_ppl)} |",
        f"| unigram, Laplace | {ngram['unigram_laplace_ppl']:.1f} | counted on the same {ngram['train_tokens']} training tokens |",
        f"| unigram, best add-λ (λ = {ngram['unigram_best_lambda']:.3g}, chosen on the held-out text) | "
        f"{ngram['unigram_best_ppl']:.1f} | an oracle smoothing: the strongest unigram |",
        f"| bigram, interpolated Kneser-Ney | {ngram['bigram_kn_ppl']:.1f} | stronger than the issue's baseline |",
    ]  # fmt: skip
    return "\n".join(rows)


def pretrain_plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ngram = json.loads((DATA / "ngram.json").read_text())
    fig, (ax, tr) = plt.subplots(1, 2, figsize=(11, 4))
    for name in PRETRAIN:
        m = metrics(name)
        if not m:
            continue
        e = [r for r in m if "eval_ppl" in r]
        ax.plot([r["step"] for r in e], [r["eval_ppl"] for r in e], "o-", ms=3, label=f"seed {name[-1]}")
        tr.plot([r["step"] for r in m], [r["loss"] for r in m], lw=0.8, label=f"seed {name[-1]}")
    for key, label, style in (("unigram_laplace_ppl", "unigram (Laplace)", ":"),
                              ("unigram_best_ppl", "unigram (best add-λ)", "--"),
                              ("bigram_kn_ppl", "bigram (Kneser-Ney)", "-.")):  # fmt: skip
        ax.axhline(ngram[key], color="gray", ls=style, label=label)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="held-out perplexity", title="Tiny LLaMA from scratch: held-out text")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    tr.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    tr.legend(fontsize=8)
    tr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "training_pretrain.png", dpi=120)
    plt.close(fig)


# --- fine-tuning -----------------------------------------------------------------------------------------


def sft_table() -> str:
    path = DATA / "sft_eval.json"
    if not path.exists():
        return "(no SFT evaluation yet)"
    results = json.loads(path.read_text())
    families = ("addition", "reverse", "alphabetical", "repeat", "chapter")
    rows = [
        "| model | task accuracy | exact match | " + " | ".join(families) + " | held-out Alice ppl | paper: LLaMA3-8B MMLU |",
        "|---|---|---|" + "---|" * len(families) + "---|---|",
    ]  # fmt: skip
    for name, label in SFT.items():
        if name not in results:
            continue
        m = results[name]["metrics"]
        ppl = f"{m['heldout_ppl']:.2f}"
        per = " | ".join(f"{m[f'task_{f}']['k']}/{m[f'task_{f}']['n']}" for f in families)
        rows.append(
            f"| {label} | {rate(m['task'])} | {rate(m['exact'])} | {per} | {ppl} | {PAPER_MMLU[name]} |"
        )
    return "\n".join(rows)


def icq_table() -> str:
    path = DATA / "icq.json"
    if not path.exists():
        return "(no ICQ measurement yet)"
    m = json.loads(path.read_text())["base"]["metrics"]
    return "\n".join([
        f"Over the {m['linears']} decoder linears of SmolLM2-135M ({m['blocks']} blocks of 64):",
        "",
        "| base | mean entropy of a block's NF4 codes (bits; at most 4) | mean relative error ‖W − deq(W)‖ / ‖W‖ |",
        "|---|---|---|",
        f"| NF4 (QLoRA) | {m['entropy_nf4']:.4f} | {m['rel_error_nf4']:.4f} |",
        f"| NF4 + ICQ (IR-QLoRA) | {m['entropy_icq']:.4f} | {m['rel_error_icq']:.4f} |",
    ])  # fmt: skip


def dpo_table() -> str:
    path = DATA / "dpo_eval.json"
    if not path.exists():
        return "(no DPO evaluation yet)"
    results = json.loads(path.read_text())
    run = [r for r in metrics("dpo-lora") if "reward_margin" in r]
    rows = ["| model | answers following the rule (held-out prompts) | answers under 3 words | mean words | median words |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name, label in (("base", "SmolLM2-135M-Instruct"), ("dpo", "after DPO (LoRA)")):
        if name in results:
            m = results[name]["metrics"]
            short = rate(m["under_3_words"]) if "under_3_words" in m else "-"
            rows.append(f"| {label} | {rate(m['follows'])} | {short} | {m['mean_words']:.1f} | {m['median_words']} |")
    if run:
        head, tail = run[:5], run[-5:]
        avg = lambda rs, k: statistics.mean(r[k] for r in rs)  # noqa: E731
        rows += ["", "| training pairs (mean of 5 steps) | reward margin | reward accuracy | loss |", "|---|---|---|---|",
                 f"| first 5 steps | {avg(head, 'reward_margin'):.3f} | {avg(head, 'reward_accuracy'):.2f} | {avg(head, 'loss'):.3f} |",
                 f"| last 5 steps | {avg(tail, 'reward_margin'):.3f} | {avg(tail, 'reward_accuracy'):.2f} | {avg(tail, 'loss'):.3f} |"]  # fmt: skip
    held = [r for r in run if "eval_reward_margin" in r]
    if held:
        rows += ["", "| held-out pairs (60) at step | reward margin | reward accuracy | DPO loss | held-out text perplexity |",
                 "|---|---|---|---|---|"]  # fmt: skip
        rows += [f"| {r['step']} | {r['eval_reward_margin']:.3f} | {r['eval_reward_accuracy']:.2f} | "
                 f"{r['eval_dpo_loss']:.3f} | {r.get('eval_ppl', float('nan')):.2f} |" for r in held]  # fmt: skip
    return "\n".join(rows)


def finetune_plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dp) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("lora", "qlora", "irqlora"):
        m = [r for r in metrics(f"sft-{name}") if "loss" in r]
        if m:
            ax.plot([r["step"] for r in m], [r["loss"] for r in m], lw=1, label=SFT[name])
    ax.set(xlabel="step", ylabel="loss on assistant tokens", title="SFT on the offline instruction set")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    m = [r for r in metrics("dpo-lora") if "reward_margin" in r]
    if m:
        dp.plot([r["step"] for r in m], [r["reward_margin"] for r in m], label="reward margin (training pairs)")
        held = [r for r in m if "eval_reward_margin" in r]
        dp.plot([r["step"] for r in held], [r["eval_reward_margin"] for r in held], "o-", color="C2",
                label="reward margin (held-out pairs)")  # fmt: skip
        dp2 = dp.twinx()
        dp2.plot([r["step"] for r in m], [r["loss"] for r in m], color="C1", lw=0.8, label="DPO loss")
        dp2.set_ylabel("DPO loss")
        dp.legend(loc="upper left", fontsize=8)
        dp2.legend(loc="upper right", fontsize=8)
    dp.set(xlabel="step", ylabel="β · (chosen − rejected log-ratio)", title="DPO (LoRA)")
    dp.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "training_finetune.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the recipes' runs are")
    args = ap.parse_args()
    copy_runs(args.runs)
    write_section("pretrain", pretrain_table(), PAGE)
    write_section("sft", sft_table(), PAGE)
    write_section("icq", icq_table(), PAGE)
    write_section("dpo", dpo_table(), PAGE)
    pretrain_plot()
    finetune_plot()
    print(f"wrote {PAGE.relative_to(ROOT)}, training_pretrain.png, training_finetune.png")


if __name__ == "__main__":
    main()
