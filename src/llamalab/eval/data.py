"""Evaluation text: a file, a folder of text files, or a named dataset with the literature's split/joining.

Named datasets are downloaded through `datasets` (the `eval` extra) and so need a network; offline they
fail at once with one line instead of after the hub client's retries. The splits and joins are those of
the GPTQ code base, which the low-bit LLaMA-3 study (arXiv 2404.14047) and most quantization papers reuse:

- `wikitext2`: `wikitext` / `wikitext-2-raw-v1`, **test** split, texts joined with "\\n\\n", tokenized once.
- `ptb`: `ptb_text_only` / `penn_treebank`, **validation** split, sentences joined with "\\n\\n" (GPTQ's
  `get_ptb`; its "ptb-new" variant uses test and " ").
- `c4`: `allenai/c4`, file `en/c4-validation.00000-of-00008.json.gz`; with `random.seed(0)`, 256 times: draw
  random documents until one has at least `seq_len` tokens, then a random `seq_len` window of it (GPTQ's
  `get_c4` eval part). The windows are concatenated, so the non-overlapping protocol sees exactly them.

Offline text for tests and examples: `llamalab.data.sample_text()` (Alice's Adventures in Wonderland).
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llamalab.errors import LlamalabError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".raw"}


@dataclass
class EvalTokens:
    """Token ids to evaluate and where they came from."""

    ids: list[int]
    source: str
    description: str
    details: dict[str, Any] = field(default_factory=dict)


# name -> (what it is, loader)
NAMED = {
    "wikitext2": "WikiText-2 raw, test split, joined with '\\n\\n'",
    "ptb": "Penn Treebank (ptb_text_only), validation split, joined with '\\n\\n'",
    "c4": "C4 en validation shard 0, 256 random seq_len windows (seed 0)",
}


def read_text(path: Path) -> str:
    """A text file's contents; an empty or non-UTF-8 file is a one-line error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlamalabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise LlamalabError(f"{path}: the file is empty")
    return text


def read_source_text(source: str) -> tuple[str, str]:
    """(text, description) of a file or a folder of text files (sorted by name, joined with "\\n\\n")."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_text(path), f"file {path}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LlamalabError(f"{path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in this folder")
        texts = []
        for p in files:
            try:
                texts.append(p.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise LlamalabError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        text = "\n\n".join(t for t in texts if t.strip())
        if not text.strip():
            raise LlamalabError(f"{path}: every text file in this folder is empty")
        return text, f"folder {path} ({len(files)} files)"
    raise LlamalabError(
        f"{source}: not a file, a folder or a known dataset (known: {', '.join(sorted(NAMED))})"
    )


def prepare_source(source: str, seq_len: int = 2048, seed: int = 0):
    """Check and read `source` now (before any model is loaded, so bad input fails fast) and return a
    function tokenizer -> EvalTokens. Named datasets are downloaded here."""
    if source.lower() in NAMED and not Path(source).exists():
        name = source.lower()
        data = _download_named(name)
        return lambda tokenizer: _tokenize_named(name, data, tokenizer, seq_len, seed)
    text, description = read_source_text(source)
    return lambda tokenizer: EvalTokens(
        tokenizer.encode(text), source, description, {"characters": len(text)}
    )


def load_tokens(source: str, tokenizer, seq_len: int = 2048, seed: int = 0) -> EvalTokens:
    """Token ids for `source`: a text file, a folder of text files, or a named dataset (see module doc).
    The text is tokenized in one call with the tokenizer's special tokens, as the reference protocols do."""
    return prepare_source(source, seq_len, seed)(tokenizer)


# --- named datasets ---------------------------------------------------------------------------------


def hub_dataset(*args: Any, what: str, instead: str = "a local text file or folder", **kwargs: Any):
    """`datasets.load_dataset(*args, **kwargs)`, with one-line errors for a missing package or network."""
    try:
        import datasets
    except ImportError:
        raise LlamalabError(
            f"{what} is loaded with the `datasets` package: pip install 'llamalab[eval]'"
        ) from None
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "") or os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ) not in ("0", "")
    if not offline and not _hub_reachable():
        raise LlamalabError(
            f"{what} must be downloaded from the Hugging Face Hub, which cannot be reached (offline?); "
            f"evaluate {instead} instead"
        )
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlamalabError(f"{what}: could not load it through `datasets` ({reason[:200]})") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_named(name: str):
    what = f"dataset {name!r}"
    if name == "wikitext2":
        return hub_dataset("wikitext", "wikitext-2-raw-v1", split="test", what=what)["text"]
    if name == "ptb":
        return hub_dataset("ptb_text_only", "penn_treebank", split="validation", what=what)["sentence"]
    if name == "c4":
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return hub_dataset("allenai/c4", data_files=files, split="validation", what=what)["text"]
    raise LlamalabError(f"unknown dataset {name!r}; known: {', '.join(sorted(NAMED))}")


def _tokenize_named(name: str, texts: list[str], tokenizer, seq_len: int, seed: int) -> EvalTokens:
    if name == "c4":
        return EvalTokens(c4_windows(texts, tokenizer, seq_len, seed), name, NAMED[name], {"seed": seed})
    split = "test" if name == "wikitext2" else "validation"
    ids = tokenizer.encode("\n\n".join(texts))
    return EvalTokens(ids, name, NAMED[name], {"split": split, "joiner": "\\n\\n"})


def c4_windows(texts: list[str], tokenizer, seq_len: int, seed: int = 0, n: int = 256) -> list[int]:
    """GPTQ's C4 evaluation windows: the same random stream (`random.seed(seed)`), concatenated."""
    rng = random.Random(seed)
    out: list[int] = []
    for _ in range(n):
        while True:
            i = rng.randint(0, len(texts) - 1)
            ids = tokenizer.encode(texts[i])
            if len(ids) >= seq_len:
                break
        # GPTQ draws randint(0, len - seqlen - 1); a document of exactly seq_len tokens starts at 0.
        start = rng.randint(0, max(len(ids) - seq_len - 1, 0))
        out.extend(ids[start : start + seq_len])
    return out
