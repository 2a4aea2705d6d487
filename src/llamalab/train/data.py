"""Training data: sources tokenized once and cached on disk, cut into rows deterministically, mixed by weight.

- A **source** is a text file, a folder of `.txt` files (one document each), a `.jsonl` file, or the
  shipped text (`alice`: its training part, one document per chapter; `alice-heldout`: the rest). Its
  format is `text` (documents; JSONL lines' `field`), `chat` (JSONL `{"messages": [...]}`, rendered with
  the model's chat template; only assistant tokens are trained on) or `pairs` (JSONL `{"prompt", "chosen",
  "rejected"}` for DPO; each a string, or messages in chat form).
- **Tokenization** happens once per (content, tokenizer, format) and is cached in
  `$XDG_CACHE_HOME/llamalab/tokens` (written atomically) as flat token and loss-mask arrays with document
  offsets; a malformed JSONL line is an error naming the file and line.
- **Rows** (`RowSource`): with packing, each epoch concatenates the documents in a seeded random order and
  cuts rows of `seq_len + 1` tokens (input and shifted labels, consecutive rows overlapping by one token);
  labels never cross a document boundary, and the row's document ids keep attention within documents.
  Without packing, a row is one document, truncated and padded. Row k of a source is a pure function of
  (seed, k), so the data position is a few integers.
- **Mixture**: which source each global row comes from is drawn from the weights with a generator keyed
  by (seed, row index); its state (rows consumed, rows per source) is saved with every checkpoint. A replay
  source (continued pretraining) is one more member at `replay_fraction` of the rows.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.errors import LlamalabError
from llamalab.io.jsonl import jsonl_values
from llamalab.train.config import DataConfig, SourceConfig

IGNORE = -100  # label of a position that is not trained on


@dataclass
class TokenizedSource:
    """Documents as one flat token array (with a trainable-target mask) and document offsets."""

    name: str
    tokens: np.ndarray  # (N,) int64
    mask: np.ndarray  # (N,) bool: whether token t may be a training target
    offsets: np.ndarray  # (n_docs + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Row:
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE where nothing is trained
    doc_ids: torch.Tensor  # (L,) document of each position (attention stays within one)


# --- reading and tokenizing -------------------------------------------------------------------------------


def resolve_format(src: SourceConfig, objective: str) -> str:
    if src.format != "auto":
        if src.format not in ("text", "chat", "pairs"):
            raise LlamalabError(f"data source {src.source}: format {src.format!r}; use text, chat or pairs")
        return src.format
    return {"clm": "text", "sft": "chat", "dpo": "pairs"}[objective]


def load_source(src: SourceConfig, fmt: str, tokenizer, template) -> TokenizedSource:
    """`src` tokenized in format `fmt` (from the cache when the same content was tokenized before)."""
    raw, name = _read(src)
    key = hashlib.sha256()
    for part in (
        raw,
        fmt,
        src.field,
        _tokenizer_fingerprint(tokenizer),
        template.fingerprint if template else "",
    ):
        key.update(part if isinstance(part, bytes) else str(part).encode())
    cache = _cache_dir() / f"{key.hexdigest()[:32]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return TokenizedSource(name, z["tokens"], z["mask"], z["offsets"])
    docs = _documents(raw, src, fmt, name, tokenizer, template)
    if not docs:
        raise LlamalabError(f"{name}: no documents to train on")
    lengths = [len(t) for t, _ in docs]
    out = TokenizedSource(
        name,
        np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in docs]),
        np.concatenate([np.asarray(m, dtype=bool) for _, m in docs]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )
    _atomic_savez(cache, tokens=out.tokens, mask=out.mask, offsets=out.offsets)
    return out


def _read(src: SourceConfig) -> tuple[bytes, str]:
    from llamalab.data import alice_split

    if src.source in ("alice", "alice-heldout"):
        part = alice_split()[0 if src.source == "alice" else 1]
        return part.encode(), src.source
    path = Path(src.source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise LlamalabError(f"{path}: the folder holds no .txt files")
        # One document per file, joined with a separator no text contains.
        return b"\x00".join(f.read_bytes() for f in files), str(path)
    if not path.is_file():
        raise LlamalabError(
            f"data source {src.source!r}: no such file or folder (or 'alice', 'alice-heldout')"
        )
    return path.read_bytes(), str(path)


def _documents(raw: bytes, src: SourceConfig, fmt: str, name: str, tokenizer, template):
    """[(tokens, trainable mask)] of the source."""
    from llamalab.data import chapters

    if fmt == "text" and not name.endswith(".jsonl"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LlamalabError(f"{name}: training text must be UTF-8") from None
        parts = chapters(text) if src.source in ("alice", "alice-heldout") else text.split("\x00")
        return [_text_doc(p, tokenizer) for p in parts if p.strip()]
    rows = _jsonl(raw, name)
    if fmt == "text":
        docs = []
        for i, row in rows:
            if not isinstance(row.get(src.field), str):
                raise LlamalabError(f"{name}:{i}: no string field {src.field!r}")
            docs.append(_text_doc(row[src.field], tokenizer))
        return docs
    if template is None:
        raise LlamalabError(f"{name}: format {fmt} needs a model with a chat template")
    if fmt == "chat":
        return [template.conversation(row.get("messages"), f"{name}:{i}") for i, row in rows]
    return [doc for i, row in rows for doc in template.pair(row, f"{name}:{i}")]


def _text_doc(text: str, tokenizer) -> tuple[list[int], list[bool]]:
    ids = tokenizer.encode(text)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]  # a document ends: the model learns where texts stop
    return ids, [True] * len(ids)


def _jsonl(raw: bytes, name: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for i, row in jsonl_values(raw, name):
        if not isinstance(row, dict):
            raise LlamalabError(f"{name}:{i}: each line must be a JSON object")
        rows.append((i, row))
    return rows


def _tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = root / "llamalab" / "tokens"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- rows ----------------------------------------------------------------------------------------------


class RowSource:
    """Rows of one tokenized source in a deterministic order: row k is a pure function of (seed, k)."""

    def __init__(self, src: TokenizedSource, seq_len: int, packing: bool, seed: int, pad_id: int = 0) -> None:
        self.src, self.L, self.packing, self.seed, self.pad_id = src, seq_len, packing, seed, pad_id
        total = int(src.offsets[-1])
        self.rows_per_epoch = (total - 1) // seq_len if packing else len(src)
        if self.rows_per_epoch < 1:
            raise LlamalabError(f"{src.name}: {total} tokens are fewer than one row of {seq_len + 1}")
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents of `epoch` in order, and their start offsets in that epoch's stream."""
        if self._epoch is None or self._epoch[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.src))
            starts = np.concatenate([[0], np.cumsum(self.src.lengths[perm])])
            self._epoch = (epoch, perm, starts)
        return self._epoch[1], self._epoch[2]

    def row(self, k: int) -> Row:
        epoch, r = divmod(k, self.rows_per_epoch)
        perm, starts = self._order(epoch)
        if not self.packing:
            return self._padded(int(perm[r]), r)
        begin, end = r * self.L, r * self.L + self.L + 1
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        tokens, mask, docs = [], [], []
        d = first
        while sum(map(len, tokens)) < end - begin:
            t, m = self.src.doc(int(perm[d]))
            lo = max(begin - int(starts[d]), 0)
            hi = min(end - int(starts[d]), len(t))
            tokens.append(t[lo:hi])
            mask.append(m[lo:hi])
            docs.append(np.full(hi - lo, d))
            d += 1
        return self._row(np.concatenate(tokens), np.concatenate(mask), np.concatenate(docs))

    def _padded(self, doc: int, r: int) -> Row:
        t, m = self.src.doc(doc)
        t, m = t[: self.L + 1], m[: self.L + 1]
        n = len(t)
        pad = self.L + 1 - n
        tokens = np.concatenate([t, np.full(pad, self.pad_id)])
        mask = np.concatenate([m, np.zeros(pad, dtype=bool)])
        docs = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(pad, dtype=np.int64)])
        return self._row(tokens, mask, docs)

    @staticmethod
    def _row(tokens: np.ndarray, mask: np.ndarray, docs: np.ndarray) -> Row:
        # Position i predicts token i+1: trained where that token is a target of the same document.
        valid = mask[1:] & (docs[1:] == docs[:-1])
        labels = np.where(valid, tokens[1:], IGNORE)
        return Row(
            torch.from_numpy(tokens[:-1].astype(np.int64)),
            torch.from_numpy(labels.astype(np.int64)),
            torch.from_numpy(docs[:-1].astype(np.int64)),
        )


class Mixture:
    """Rows drawn from several sources by weight; `state()` / `load_state()` are the data position."""

    def __init__(self, sources: list[RowSource], weights: list[float], seed: int) -> None:
        self.sources, self.seed = sources, seed
        w = np.asarray(weights, dtype=np.float64)
        self.cumulative = np.cumsum(w / w.sum())
        self.rows = 0
        self.counts = [0] * len(sources)

    def next_rows(self, n: int) -> list[Row]:
        out = []
        for _ in range(n):
            u = np.random.default_rng([self.seed, self.rows]).random()
            k = min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.sources) - 1)
            out.append(self.sources[k].row(self.counts[k]))
            self.counts[k] += 1
            self.rows += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"rows": self.rows, "counts": list(self.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        if len(state["counts"]) != len(self.sources):
            raise LlamalabError("the checkpoint's data position is for another list of data sources")
        self.rows, self.counts = int(state["rows"]), [int(c) for c in state["counts"]]


def collate(rows: list[Row]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.stack([r.input_ids for r in rows]),
        "labels": torch.stack([r.labels for r in rows]),
        "doc_ids": torch.stack([r.doc_ids for r in rows]),
    }


def build_mixture(cfg: DataConfig, objective: str, tokenizer, template, pad_id: int) -> Mixture:
    """The training mixture of `cfg` (sources, weights, replay) for `objective`."""
    members = [(s, s.weight) for s in cfg.train]
    if cfg.replay is not None and cfg.replay_fraction > 0:
        total = sum(w for _, w in members)
        scale = (1 - cfg.replay_fraction) / total
        members = [(s, w * scale) for s, w in members] + [(cfg.replay, cfg.replay_fraction)]
    sources = []
    for i, (s, _) in enumerate(members):
        tokenized = load_source(s, resolve_format(s, objective), tokenizer, template)
        sources.append(RowSource(tokenized, cfg.seq_len, cfg.packing, cfg.seed * 1000 + i, pad_id))
    return Mixture(sources, [w for _, w in members], cfg.seed)
