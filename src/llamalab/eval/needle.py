"""Needle in a haystack (G. Kamradt's LLMTest_NeedleInAHaystack), over any haystack text.

A grid of context lengths x insertion depths. For each cell the haystack (any text file; by default the
shipped "Alice's Adventures in Wonderland", repeated if too short) is cut to the token budget that leaves
room for the prompt's other parts and the answer, the needle is inserted at `depth` percent of it (moved
back to the end of the preceding sentence, i.e. after the token(s) of "."), and the model is asked the
question. As in the reference: needle "The best thing to do in San Francisco is eat a sandwich and sit in
Dolores Park on a sunny day.", question "What is the best thing to do in San Francisco?", system prompt
"You are a helpful AI bot that answers questions for a user. Keep your response short and direct", the
document and the question as two user turns, with the instruction "Don't give information outside the
document or repeat your findings". Models with a chat template get it; others get a plain
"document / Question: / Answer:" prompt.

Differs from the reference: it scores with a GPT-4 judge (1-10); we score without a judge, by whether the
expected answer phrase appears in the greedy reply (`hit`, after lower-casing and collapsing punctuation and
whitespace) and by the share of the answer's words the reply contains (`recall`). The token budget is
computed exactly from the rendered prompt instead of the reference's fixed 200-token buffer, so a cell's
length is the prompt plus the new tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llamalab.errors import LlamalabError
from llamalab.eval.forward import Forward
from llamalab.model_options import check_length

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER = "eat a sandwich and sit in Dolores Park"
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
INSTRUCTION = "Don't give information outside the document or repeat your findings"
_PLACEHOLDER = "\u2063HAYSTACK\u2063"


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def score_reply(reply: str, answer: str) -> tuple[bool, float]:
    """(hit, recall): the answer phrase appears in the reply; share of the answer's words in the reply."""
    r, a = normalize(reply), normalize(answer)
    words = a.split()
    reply_words = set(r.split())
    recall = sum(w in reply_words for w in words) / len(words) if words else 0.0
    return (a in r), recall


class PromptBuilder:
    """Renders the needle prompt around a haystack and measures its fixed overhead in tokens."""

    def __init__(self, llm, question: str, chat: bool | None = None) -> None:
        self.llm, self.question = llm, question
        self.chat = bool(llm.tokenizer.chat_template) if chat is None else chat
        if self.chat and not llm.tokenizer.chat_template:
            raise LlamalabError("--chat: this model has no chat template")
        head, _, tail = self.render(_PLACEHOLDER).partition(_PLACEHOLDER)
        self.head_ids = llm.encode(head) if head else []
        self.tail_ids = llm.encode(tail, add_special_tokens=False)

    def render(self, document: str) -> str:
        if self.chat:
            return self.llm.apply_chat_template(
                [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": document},
                    {"role": "user", "content": f"{self.question} {INSTRUCTION}"},
                ]
            )
        return f"{document}\n\nQuestion: {self.question} {INSTRUCTION}\nAnswer:"

    def ids(self, haystack_ids: list[int]) -> list[int]:
        # Token surgery at the joins, as the reference does it (it inserts in token space and decodes).
        return self.head_ids + haystack_ids + self.tail_ids


def insert_needle(context: list[int], needle: list[int], depth: float, period_ids: set[int]) -> list[int]:
    """The reference's insertion: at `depth` percent of the context tokens, moved back until the token
    before the insertion point is a sentence end; at 100 % the needle goes last."""
    if depth >= 100:
        return context + needle
    point = int(len(context) * depth / 100)
    while point > 0 and context[point - 1] not in period_ids:
        point -= 1
    return context[:point] + needle + context[point:]


@dataclass
class NeedleResult:
    lengths: list[int]
    depths: list[float]
    hit: list[list[float]]  # [depth][length], mean over trials
    recall: list[list[float]]
    trials: int
    seconds: float
    tokens_per_s: float
    records: list[dict] = field(default_factory=list)

    def metrics(self) -> dict:
        cells = [v for row in self.hit for v in row]
        return {
            "accuracy": sum(cells) / len(cells),
            "recall": sum(v for row in self.recall for v in row) / len(cells),
            "accuracy_by_length": {
                str(n): sum(self.hit[d][i] for d in range(len(self.depths))) / len(self.depths)
                for i, n in enumerate(self.lengths)
            },
            "grid_hit": {
                f"{d:g}": dict(zip(map(str, self.lengths), row)) for d, row in zip(self.depths, self.hit)
            },
            "trials_per_cell": self.trials,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
        }


def evaluate_needle(
    llm,
    haystack: str,
    lengths: list[int],
    depths: list[float],
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
    max_new_tokens: int = 32,
    trials: int = 1,
    chat: bool | None = None,
    fwd: Forward | None = None,
    progress: bool | None = None,
    check: bool = True,
) -> NeedleResult:
    """Hit rate and answer recall over the lengths x depths grid (trial t starts the haystack t sentences
    further into the text, so trials see different text)."""
    if not haystack.strip():
        raise LlamalabError("the haystack text is empty")
    if trials < 1:
        raise LlamalabError(f"--trials must be at least 1, got {trials}")
    for d in depths:
        if not 0 <= d <= 100:
            raise LlamalabError(f"depths are percentages in [0, 100], got {d}")
    lengths = sorted(set(lengths))
    for n in lengths:
        if check:  # False: lengths beyond the context, for a `fwd` that reduces prompts (XL3M, retrieval)
            check_length(llm, n, f"needle length {n}")
    fwd = fwd or Forward(llm, scores_need_cache=False)
    builder = PromptBuilder(llm, question, chat)
    needle_ids = llm.encode(needle, add_special_tokens=False)
    period_ids = set(llm.encode(".", add_special_tokens=False))  # the reference's `encode('.')`
    hay_ids = llm.encode(haystack, add_special_tokens=False)
    sentence_starts = [0] + [i + 1 for i, t in enumerate(hay_ids) if t in period_ids]
    stop = set(llm.eos_token_ids)
    hit = [[0.0] * len(lengths) for _ in depths]
    rec = [[0.0] * len(lengths) for _ in depths]
    records = []
    bar = tqdm(
        total=len(lengths) * len(depths) * trials,
        unit="cell",
        desc="needle",
        disable=None if progress is None else not progress,
    )
    try:
        for li, length in enumerate(lengths):
            budget = length - max_new_tokens - len(builder.head_ids) - len(builder.tail_ids) - len(needle_ids)
            if budget < 1:
                raise LlamalabError(f"length {length} leaves no room for a haystack around the needle")
            for t in range(trials):
                start = sentence_starts[t % len(sentence_starts)]
                context = hay_ids[start:]
                while (
                    len(context) < budget
                ):  # a short haystack is repeated, as the reference reads more files
                    context = context + hay_ids
                context = context[:budget]
                for di, depth in enumerate(depths):
                    ids = builder.ids(insert_needle(context, needle_ids, depth, period_ids))
                    out = fwd.greedy(ids, max_new_tokens, stop)
                    reply = llm.decode([i for i in out if i not in stop])
                    h, r = score_reply(reply, answer)
                    hit[di][li] += h / trials
                    rec[di][li] += r / trials
                    records.append(
                        {
                            "length": length,
                            "depth": depth,
                            "trial": t,
                            "prompt_tokens": len(ids),
                            "reply": reply,
                            "hit": h,
                            "recall": round(r, 4),
                        }
                    )
                    bar.update(1)
                    bar.set_postfix(len=length, tok_s=f"{fwd.tokens / max(fwd.seconds, 1e-9):.0f}")
    finally:
        bar.close()
    return NeedleResult(
        lengths,
        list(depths),
        hit,
        rec,
        trials,
        fwd.seconds,
        fwd.tokens / fwd.seconds if fwd.seconds else 0.0,
        records,
    )


def read_haystack(path: str | None) -> tuple[str, str]:
    """(text, description) of the haystack: a file or folder, or the shipped Alice text."""
    if path is None:
        from llamalab.data import sample_text

        return sample_text(), "Alice's Adventures in Wonderland (llamalab.data.sample_text)"
    from llamalab.eval.data import read_source_text

    if not Path(path).expanduser().exists():
        raise LlamalabError(f"{path}: no such haystack file or folder")
    return read_source_text(path)
