"""A tiny model directory and small data files for training runs."""

from __future__ import annotations

import json

import pytest

from llamalab.data import alice_split


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
            for w in ("Alice", "Queen", "Hatter", "Rabbit", "Dinah", "tea")]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory):
    """Preferences with a checkable rule: the chosen answer is the short one."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    text = alice_split()[0].split()
    rows = [{"prompt": " ".join(text[i : i + 6]), "chosen": " Yes.", "rejected": " " + " ".join(text[i + 6 : i + 14])}
            for i in range(0, 240, 20)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tiny_dir, out, **overrides) -> list[str]:
    """Overrides for a fast run on the tiny model (threads pinned: CPU sums depend on the thread count)."""
    base = {
        "model": str(tiny_dir),
        "data.seq_len": 48,
        "data.eval_tokens": 256,
        "batch.micro": 2,
        "steps": 6,
        "optim.lr": 3e-3,
        "checkpoint.every": 2,
        "eval.every": 3,
        "out": str(out),
        "threads": 1,
    }
    return [f"{k}={v}" for k, v in {**base, **overrides}.items()]
