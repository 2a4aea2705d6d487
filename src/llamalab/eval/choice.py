"""Multiple choice by continuation log-likelihood, with lm-evaluation-harness semantics.

Each choice is scored as the log-likelihood of `delimiter + choice` after the context (lm-eval's
`multiple_choice` output type, target delimiter " "), with lm-eval's encoding (trailing context whitespace
moved to the continuation, whole string tokenized once, left truncation to the context length):

- `acc`: the choice with the highest log-likelihood is the gold one;
- `acc_norm`: the same after dividing each log-likelihood by the choice's length in characters, which is
  what lm-eval 0.4 computes (`len(choice)`; the same as its UTF-8 byte length for ASCII text);
- `acc_bytes`: divided by the UTF-8 byte length (lm-eval's `acc_bytes`), which differs from acc_norm only
  for non-ASCII choices.

Partial scoring (Winogrande): the options go into the context and only the shared suffix is scored; as in
lm-eval, `acc_norm` then divides by the length of each option-filled context.

Local tasks are JSONL files, one question per line:

    {"context": "Question: ...\\nAnswer:", "choices": ["first", "second"], "gold": 1}
    {"contexts": ["The trophy doesn't fit because the trophy", "... the suitcase"], "continuation": "is too big.", "gold": 0}

`gold` is the index of the right choice (or the right choice's text). Built-in adapters `piqa`, `arc_easy`,
`arc_challenge`, `hellaswag`, `winogrande` load the hub datasets lm-eval 0.4 uses (network needed), with
its prompts and splits (test where a task has one, else validation).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llamalab.errors import LlamalabError
from llamalab.eval.forward import Forward, encode_pair, prefix_token_id
from llamalab.io.jsonl import jsonl_values


@dataclass
class ChoiceDoc:
    """One question: k (context, continuation) requests, the gold index, and the strings to normalise by."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    norm_strings: list[str]


def standard_doc(context: str, choices: list[str], gold: int | str, delimiter: str = " ") -> ChoiceDoc:
    """A question whose choices follow one context (PIQA, ARC, HellaSwag, most local tasks)."""
    gold_i = _gold_index(gold, choices)
    return ChoiceDoc([context] * len(choices), [delimiter + c for c in choices], gold_i, list(choices))


def partial_doc(contexts: list[str], continuation: str, gold: int, delimiter: str = " ") -> ChoiceDoc:
    """A question whose options sit in the contexts and share one scored continuation (Winogrande)."""
    return ChoiceDoc(
        list(contexts),
        [delimiter + continuation] * len(contexts),
        _gold_index(gold, contexts),
        list(contexts),
    )


def _gold_index(gold: int | str, options: list[str]) -> int:
    if isinstance(gold, bool) or not isinstance(gold, (int, str)):
        raise ValueError(f"'gold' must be an index or the text of a choice, got {gold!r}")
    if isinstance(gold, str):
        if gold in options:
            return options.index(gold)
        if gold.strip().lstrip("-").isdigit():
            gold = int(gold)
        else:
            raise ValueError(f"'gold' {gold!r} is not one of the choices")
    if not 0 <= gold < len(options):
        raise ValueError(f"'gold' {gold} is out of range for {len(options)} choices")
    return gold


# --- task sources -------------------------------------------------------------------------------------


def read_jsonl_task(path: Path, delimiter: str = " ") -> list[ChoiceDoc]:
    """Read a local task; every malformed line is a one-line error naming the file and line."""
    docs = []
    for n, row in jsonl_values(path.read_bytes(), str(path)):
        try:
            docs.append(_doc_from_row(row, delimiter))
        except ValueError as e:
            raise LlamalabError(f"{path}:{n}: {e}") from None
    if not docs:
        raise LlamalabError(f"{path}: the file is empty (expected one JSON question per line)")
    return docs


def _doc_from_row(row: object, delimiter: str) -> ChoiceDoc:
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "gold" not in row:
        raise ValueError("missing 'gold' (the index of the right choice)")
    if "contexts" in row:
        contexts, cont = row["contexts"], row.get("continuation")
        if not _str_list(contexts) or not isinstance(cont, str):
            raise ValueError(
                "'contexts' must be a list of at least 2 non-empty strings and 'continuation' a string"
            )
        return partial_doc(contexts, cont, row["gold"], delimiter)
    context, choices = row.get("context"), row.get("choices")
    if not isinstance(context, str) or not _str_list(choices):
        raise ValueError(
            "needs 'context' (a string) and 'choices' (a list of at least 2 non-empty strings), "
            "or 'contexts' and 'continuation'"
        )
    return standard_doc(context, choices, row["gold"], delimiter)


def _str_list(x: object) -> bool:
    return isinstance(x, list) and len(x) >= 2 and all(isinstance(s, str) and s for s in x)


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag/utils.py: WikiHow artefacts in brackets, doubled spaces.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _winogrande_doc(d: dict) -> ChoiceDoc:
    idx = d["sentence"].index("_")
    contexts = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
    return partial_doc(contexts, d["sentence"][idx + 1 :].strip(), {"1": 0, "2": 1}[d["answer"]])


def _arc_doc(d: dict) -> ChoiceDoc:
    """ARC-Easy and ARC-Challenge share one format."""
    return standard_doc(
        f"Question: {d['question']}\nAnswer:",
        d["choices"]["text"],
        d["choices"]["label"].index(d["answerKey"]),
    )


# name -> (hub dataset args, split, doc builder); prompts as in lm-eval 0.4's task YAMLs.
BUILTIN = {
    "piqa": (
        ("baber/piqa",),
        "validation",
        lambda d: standard_doc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"])),
    ),
    "arc_easy": (("allenai/ai2_arc", "ARC-Easy"), "test", _arc_doc),
    "arc_challenge": (("allenai/ai2_arc", "ARC-Challenge"), "test", _arc_doc),
    "hellaswag": (
        ("Rowan/hellaswag",),
        "validation",
        lambda d: standard_doc(
            _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
            [_hellaswag_clean(e) for e in d["endings"]],
            int(d["label"]),
        ),
    ),
    "winogrande": (("allenai/winogrande", "winogrande_xl"), "validation", _winogrande_doc),
}
OFFLINE = {"alice_cloze": "sentence endings of Alice's Adventures in Wonderland (offline, built-in)"}
ALIASES = {"arc-e": "arc_easy", "arc-c": "arc_challenge", "arc_e": "arc_easy", "arc_c": "arc_challenge"}


def load_task(task: str, delimiter: str = " ") -> tuple[list[ChoiceDoc], str]:
    """(docs, description) for a local JSONL file or a built-in adapter name."""
    path = Path(task).expanduser()
    if path.is_file():
        return read_jsonl_task(path, delimiter), f"file {path}"
    if path.is_dir():
        raise LlamalabError(f"{path}: is a folder; --task takes a JSONL file or a built-in task name")
    name = ALIASES.get(task.lower(), task.lower())
    if name == "alice_cloze":
        from llamalab.data import sample_text

        return cloze_docs(sample_text()), OFFLINE[name]
    if name not in BUILTIN:
        known = ", ".join(sorted([*BUILTIN, *OFFLINE]))
        raise LlamalabError(f"{task}: not a file and not a built-in task (built-in: {known})")
    from llamalab.eval.data import hub_dataset

    args, split, build = BUILTIN[name]
    data = hub_dataset(*args, split=split, what=f"task {name!r}", instead="a local JSONL task or alice_cloze")
    return [build(d) for d in data], f"{name} ({'/'.join(args)}, {split})"


def cloze_docs(text: str, n: int = 100, n_choices: int = 4, seed: int = 0) -> list[ChoiceDoc]:
    """An offline sentence-completion task from real text: the context is the first 60 % of a sentence's
    words, the choices its true ending and the endings of other sentences (the HellaSwag/LAMBADA idea,
    without their data). Deterministic for a given text and seed."""
    import random

    flat = " ".join(text.split())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", flat)]
    sentences = [s for s in sentences if 12 <= len(s.split()) <= 40]
    if len(sentences) < n_choices:
        raise LlamalabError(f"the text has only {len(sentences)} usable sentences for a cloze task")
    rng = random.Random(seed)
    picked = rng.sample(range(len(sentences)), min(n, len(sentences)))
    split = [
        (" ".join(w[: int(len(w) * 0.6)]), " ".join(w[int(len(w) * 0.6) :]))
        for w in (s.split() for s in sentences)
    ]
    docs = []
    for i in picked:
        context, ending = split[i]
        others = rng.sample([j for j in range(len(split)) if j != i], n_choices - 1)
        choices = [split[j][1] for j in others]
        gold = rng.randrange(n_choices)
        choices.insert(gold, ending)
        docs.append(standard_doc(context, choices, gold))
    return docs


def docs_to_jsonl(docs: list[ChoiceDoc]) -> str:
    """The JSONL text of standard docs (the local task format), e.g. to hand the same task to lm-eval."""
    lines = []
    for d in docs:
        if len(set(d.contexts)) != 1:
            raise LlamalabError("only docs with one context can be written in the standard JSONL format")
        lines.append(json.dumps({"context": d.contexts[0], "choices": d.norm_strings, "gold": d.gold}))
    return "\n".join(lines) + "\n"


# --- evaluation ---------------------------------------------------------------------------------------


@dataclass
class ChoiceResult:
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    acc_bytes: float
    docs: int
    requests: int
    input_tokens: int
    seconds: float
    tokens_per_s: float
    predictions: list[dict]

    def metrics(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "predictions"}


def _mean_stderr(xs: list[float]) -> float:
    # lm-eval's `mean_stderr`: sample standard deviation / sqrt(n).
    n = len(xs)
    if n < 2:
        return 0.0
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def evaluate_choice(
    llm,
    docs: list[ChoiceDoc],
    fwd: Forward | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> ChoiceResult:
    """Score every choice of every doc and compute acc / acc_norm / acc_bytes."""
    fwd = fwd or Forward(llm)
    tok = llm.tokenizer
    prefix = prefix_token_id(tok)
    requests, owners = [], []
    for i, doc in enumerate(docs):
        for ctx, cont in zip(doc.contexts, doc.continuations):
            requests.append(encode_pair(tok, ctx, cont, prefix))
            owners.append(i)
    lls: list[float] = []
    bar = tqdm(
        total=len(requests), unit="req", desc="choice", disable=None if progress is None else not progress
    )
    try:
        step = max(batch_size, 1) * 8
        for s in range(0, len(requests), step):
            lls.extend(ll for ll, _ in fwd.score(requests[s : s + step], batch_size))
            bar.update(min(step, len(requests) - s))
            bar.set_postfix(tok_s=f"{fwd.tokens / max(fwd.seconds, 1e-9):.0f}")
    finally:
        bar.close()
    acc, acc_norm, acc_bytes, preds = [], [], [], []
    k = 0
    for doc in docs:
        n = len(doc.contexts)
        ll = lls[k : k + n]
        k += n
        pred = _argmax(ll)
        pred_norm = _argmax([x / len(s) for x, s in zip(ll, doc.norm_strings)])
        pred_bytes = _argmax([x / len(s.encode("utf-8")) for x, s in zip(ll, doc.norm_strings)])
        acc.append(float(pred == doc.gold))
        acc_norm.append(float(pred_norm == doc.gold))
        acc_bytes.append(float(pred_bytes == doc.gold))
        preds.append({"gold": doc.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll})
    n = len(docs)
    return ChoiceResult(
        acc=sum(acc) / n,
        acc_stderr=_mean_stderr(acc),
        acc_norm=sum(acc_norm) / n,
        acc_norm_stderr=_mean_stderr(acc_norm),
        acc_bytes=sum(acc_bytes) / n,
        docs=n,
        requests=len(requests),
        input_tokens=fwd.tokens,
        seconds=fwd.seconds,
        tokens_per_s=fwd.tokens / fwd.seconds if fwd.seconds else 0.0,
        predictions=preds,
    )


def _argmax(xs: list[float]) -> int:
    # numpy's argmax: the first maximum wins ties, as in lm-eval.
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best
