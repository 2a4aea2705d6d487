"""Preference pairs for DPO: rows of (chosen, rejected) sequences, and the reference log-probabilities
computed once by the initial model and cached on disk.

A pair's tokens come from `ChatFormat.pair` (prompt, then response; only the response is a target). A long
prompt keeps its last `max_prompt_tokens` tokens and the response is cut to fit `seq_len` (TRL's
truncation). Rows of a batch are padded to its longest sequence: the chosen sequences first, then the
rejected ones.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamalab.errors import LlamalabError
from llamalab.train.data import Row, RowSource, TokenizedSource


@dataclass
class Pair:
    index: int  # the pair's position in its source
    chosen: Row
    rejected: Row
    reference: tuple[float, float] | None = None  # the reference model's (chosen, rejected) log-probabilities


class PairSource:
    """Pairs in a deterministic order per epoch (a `Mixture` member like `RowSource`)."""

    def __init__(self, src: TokenizedSource, seq_len: int, max_prompt: int, seed: int, pad_id: int) -> None:
        if len(src) % 2 or not len(src):
            raise LlamalabError(f"{src.name}: no preference pairs")
        self.src, self.L, self.max_prompt, self.seed, self.pad_id = src, seq_len, max_prompt, seed, pad_id
        self.n = len(src) // 2
        self.rows_per_epoch = self.n
        self.reference: torch.Tensor | None = None  # (n, 2), set by `reference_logprobs`

    def row(self, k: int) -> Pair:
        epoch, r = divmod(k, self.n)
        index = int(np.random.default_rng([self.seed, epoch]).permutation(self.n)[r])
        return self.pair(index)

    def pair(self, index: int) -> Pair:
        ref = None if self.reference is None else tuple(self.reference[index].tolist())
        return Pair(index, self._row(2 * index), self._row(2 * index + 1), ref)

    def _row(self, doc: int) -> Row:
        tokens, mask = self.src.doc(doc)
        n_prompt = int(np.argmax(mask)) if mask.any() else len(mask)
        prompt = tokens[:n_prompt][-self.max_prompt :]
        response = tokens[n_prompt:][: self.L + 1 - len(prompt)]
        if len(response) < 2:  # a row predicts from its second token on
            raise LlamalabError(
                f"{self.src.name}: pair {doc // 2} keeps no response token in {self.L} tokens"
            )
        t = np.concatenate([prompt, response])
        m = np.concatenate([np.zeros(len(prompt), dtype=bool), np.ones(len(response), dtype=bool)])
        pad = self.L + 1 - len(t)
        t = np.concatenate([t, np.full(pad, self.pad_id)])
        m = np.concatenate([m, np.zeros(pad, dtype=bool)])
        docs = np.concatenate([np.zeros(len(t) - pad, dtype=np.int64), np.ones(pad, dtype=np.int64)])
        return RowSource._row(t, m, docs)


def collate_pairs(pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs: the chosen rows, then the rejected rows (and their reference log-probs)."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    # Rows are right-padded: columns past the longest row hold only padding, so the batch is cut there (as TRL
    # pads to the longest sequence). One document per row is enough: causal attention never lets a prompt or
    # response token read the padding after it, and padding has no label.
    width = max(int((r.doc_ids == 0).sum()) for r in rows)
    ids = torch.stack([r.input_ids[:width] for r in rows])
    batch = {
        "input_ids": ids,
        "labels": torch.stack([r.labels[:width] for r in rows]),
        "doc_ids": torch.zeros_like(ids),
    }
    if all(p.reference is not None for p in pairs):
        batch["reference"] = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs])
    return batch


def reference_logprobs(model, source: PairSource, fingerprint: str, ce_chunk: int, batch: int = 4) -> None:
    """Set `source.reference`: (n_pairs, 2) summed log-probabilities of each chosen and rejected response
    under `model` in eval mode, computed once and cached by (model, data, truncation) fingerprint."""
    from llamalab.train.objectives import sequence_logprobs

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamalab" / "dpo-reference"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{fingerprint}|{source.L}|{source.max_prompt}".encode()).hexdigest()[:32]
    path = root / f"{key}.pt"
    if path.exists():
        source.reference = torch.load(path, weights_only=True)
        return
    was_training = model.training
    model.eval()
    out = torch.empty(source.n, 2, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, source.n, batch):
            pairs = [source.pair(i) for i in range(s, min(s + batch, source.n))]
            lp = sequence_logprobs(model, collate_pairs(pairs), ce_chunk).double()
            P = len(pairs)
            out[s : s + P, 0], out[s : s + P, 1] = lp[:P], lp[P:]
    model.train(was_training)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=root)
    os.close(fd)
    torch.save(out, tmp)
    os.replace(tmp, path)
    source.reference = out
