"""Held-out evaluation of the SFT and DPO runs (docs/results/training.md): greedy answers through the engine,
scored by rule.

- `sft`: the 100 held-out instructions (recipes/data/instructions-heldout.jsonl; other numbers, words and
  sentences than training, text tasks from the held-out chapters). Per task family: exact match (the
  answer equals the reference after stripping surrounding spaces) and task accuracy (the content is right
  whatever the wording: the last number is the sum; the reversed word appears; the first of the two words
  named is the earlier one; the sentence appears; the chapter's number appears).
- `icq`: no generation: the mean entropy of the NF4 codes and the relative reconstruction error of every
  decoder linear, plain NF4 against IR-QLoRA's information calibration (ICQ).
- `dpo`: the 60 held-out preference prompts (recipes/data/preferences-heldout.jsonl): the fraction of
  answers following the preference rule (`follows_format` of experiments/training_data.py: one sentence
  of at most 12 words ending with a full stop), their mean length in words, and the fraction under 3 words
  (a policy that games the rule by saying almost nothing).

A model is `NAME=SPEC`, SPEC an alias, HF directory, .gguf or a run directory (its exported `model/`), or
`nf4:SPEC` / `nf4-icq:SPEC` for that model with every decoder linear in NF4 as QLoRA / IR-QLoRA train over
it (block 64, double quantization; the study's "NormalFloat (no FT)" row). Every model runs in fp32 with
the chat template and greedy decoding, all prompts of a set in one batch (each row equals its unbatched
result).

    python experiments/training_eval.py sft --model base=smollm2-135m --model lora=runs/sft-lora \
        --json docs/results/training/sft_eval.json
    python experiments/training_eval.py dpo --model base=smollm2-135m --model dpo=runs/dpo-lora
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from training_data import follows_format  # noqa: E402

DATA = ROOT / "recipes" / "data"
FAMILIES = ("addition", "reverse", "alphabetical", "repeat", "chapter")


def load_model(spec: str, threads: int):
    import llamalab

    quant = None
    for prefix in ("nf4-icq:", "nf4:"):
        if spec.startswith(prefix):
            quant, spec = prefix[:-1], spec[len(prefix) :]
    path = Path(spec)
    if (path / "model" / "config.json").exists():  # a run directory
        spec = str(path / "model")
    llm = llamalab.load(spec, dtype="fp32", threads=threads)
    if quant:
        from llamalab.train.config import QLoRAConfig
        from llamalab.train.lora import quantize_base_nf4

        quantize_base_nf4(llm.model, QLoRAConfig(icq=quant == "nf4-icq"))
        llm.model.eval()
    return llm


def greedy_answers(llm, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    ids = [llm.chat_ids(p) for p in prompts]
    seqs = llm.generate_sequences(ids, max_new_tokens=max_new_tokens, temperature=0.0)
    return [s.text for s in seqs]


# --- SFT ----------------------------------------------------------------------------------------------------


def family(question: str) -> str:
    for prefix, name in (("What is", "addition"), ("Write the word", "reverse"), ("Which word comes", "alphabetical"),
                         ("Repeat this", "repeat"), ("Which chapter", "chapter")):  # fmt: skip
        if question.startswith(prefix):
            return name
    raise ValueError(f"no task family for {question!r}")


def task_correct(kind: str, question: str, reference: str, answer: str) -> bool:
    a = answer.strip()
    if kind == "addition":
        numbers = re.findall(r"-?\d+", a)
        return bool(numbers) and numbers[-1] == reference.rstrip(".").split("= ")[1]
    if kind == "reverse":
        return re.search(rf"\b{re.escape(reference)}\b", a, re.IGNORECASE) is not None
    if kind == "alphabetical":
        words = re.search(r": (\w+) or (\w+)\?", question).groups()
        named = [w for w in re.findall(r"\w+", a.lower()) if w in words]
        return bool(named) and named[0] == reference.rstrip(".")
    if kind == "repeat":
        flat = " ".join(a.split())
        return " ".join(reference.split()) in flat
    number = reference.split(".")[0]  # "CHAPTER X"
    return re.search(rf"\b{re.escape(number)}\b", a, re.IGNORECASE) is not None


def heldout_ppl(llm, tokens: int = 2048, seq_len: int = 256) -> float:
    """Perplexity on the held-out text exactly as the SFT recipes' `eval` measures it during training (the
    first `tokens` targets of `alice-heldout`, windows of `seq_len`), so the base rows compare with the runs."""
    import torch

    from llamalab.train.config import SourceConfig
    from llamalab.train.data import load_source

    ids = torch.from_numpy(
        load_source(SourceConfig("alice-heldout"), "text", llm.tokenizer, None).tokens[: tokens + 1]
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            y = ids[s + 1 : s + seq_len + 1]
            logits = llm.model(ids[s : s + len(y)][None])[0].float()
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
    return math.exp(total / count)


def eval_sft(llm, max_new_tokens: int) -> dict:
    rows = [json.loads(x) for x in (DATA / "instructions-heldout.jsonl").read_text().splitlines()]
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
    answers = greedy_answers(llm, prompts, max_new_tokens)
    records = []
    for r, answer in zip(rows, answers):
        q, ref = r["messages"][0]["content"], r["messages"][-1]["content"]
        kind = family(q)
        records.append({"family": kind, "question": q, "reference": ref, "answer": answer,
                        "exact": answer.strip() == ref.strip(), "task": task_correct(kind, q, ref, answer)})  # fmt: skip
    out = {"n": len(records), "heldout_ppl": heldout_ppl(llm)}
    for metric in ("exact", "task"):
        out[metric] = _share([x[metric] for x in records])
        for kind in FAMILIES:
            out[f"{metric}_{kind}"] = _share([x[metric] for x in records if x["family"] == kind])
    return {"metrics": out, "records": records}


# --- IR-QLoRA's information calibration ---------------------------------------------------------------------


def eval_icq(llm, _max_new_tokens: int) -> dict:
    """What ICQ changes in the base, over every decoder linear of the model: the mean entropy (bits) of the
    blocks' NF4 codes (the quantity ICQ maximises; 4 bits is the most a 16-code block can hold) and the
    relative reconstruction error ||W - deq(W)|| / ||W||, plain NF4 against NF4 with ICQ's shifts."""
    import torch

    from llamalab.model.modules import get_module
    from llamalab.quant.nf4 import NF4Linear, code_entropy, unpack_nf4
    from llamalab.train.lora import linear_names

    llm.model.unfuse()
    sums = {k: 0.0 for k in ("h_nf4", "h_icq", "err_nf4", "err_icq")}
    names = linear_names(llm.model)
    blocks = 0
    for name in names:
        w = get_module(llm.model, name).weight.detach().float()
        for kind, icq in (("nf4", False), ("icq", True)):
            q = NF4Linear.from_weight(w, None, 64, True, icq)
            h = code_entropy(unpack_nf4(q.qweight), 64)
            sums[f"h_{kind}"] += float(h.sum())
            sums[f"err_{kind}"] += float(torch.linalg.norm(w - q.dequantize()) / torch.linalg.norm(w))
        blocks += w.numel() // 64
    metrics = {"linears": len(names), "blocks": blocks,
               "entropy_nf4": sums["h_nf4"] / blocks, "entropy_icq": sums["h_icq"] / blocks,
               "rel_error_nf4": sums["err_nf4"] / len(names), "rel_error_icq": sums["err_icq"] / len(names)}  # fmt: skip
    return {"metrics": metrics}


# --- DPO ----------------------------------------------------------------------------------------------------


def eval_dpo(llm, max_new_tokens: int) -> dict:
    rows = [json.loads(x) for x in (DATA / "preferences-heldout.jsonl").read_text().splitlines()]
    answers = greedy_answers(llm, [r["prompt"] for r in rows], max_new_tokens)
    records = [{"prompt": r["prompt"][-1]["content"], "answer": a, "follows": follows_format(a),
                "words": len(a.split())} for r, a in zip(rows, answers)]  # fmt: skip
    words = sorted(x["words"] for x in records)
    metrics = {"n": len(records), "follows": _share([x["follows"] for x in records]),
               "under_3_words": _share([x["words"] < 3 for x in records]),
               "mean_words": sum(words) / len(words), "median_words": words[len(words) // 2]}  # fmt: skip
    return {"metrics": metrics, "records": records}


def _share(flags: list[bool]) -> dict:
    """k of n, the fraction and its binomial standard error."""
    n, k = len(flags), sum(flags)
    p = k / n
    return {"k": k, "n": n, "p": p, "se": math.sqrt(p * (1 - p) / n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["sft", "dpo", "icq"])
    ap.add_argument("--model", action="append", required=True, help="NAME=SPEC (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="merge the results into this JSON file (by model name)")
    args = ap.parse_args()
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for item in args.model:
        name, _, spec = item.partition("=")
        t0 = time.perf_counter()
        llm = load_model(spec, args.threads)
        result = {"sft": eval_sft, "dpo": eval_dpo, "icq": eval_icq}[args.task](llm, args.max_new_tokens)
        result.update(model=spec, seconds=round(time.perf_counter() - t0, 1))
        results[name] = result
        m = result["metrics"]
        if args.task == "sft":
            per = " ".join(f"{k}={m[f'task_{k}']['k']}/{m[f'task_{k}']['n']}" for k in FAMILIES)
            print(
                f"{name}: exact {m['exact']['k']}/{m['n']}  task {m['task']['k']}/{m['n']}  ({per})",
                flush=True,
            )
        elif args.task == "icq":
            print(f"{name}: {json.dumps(m)}", flush=True)
        else:
            print(
                f"{name}: follows {m['follows']['k']}/{m['n']}  mean words {m['mean_words']:.1f}", flush=True
            )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
