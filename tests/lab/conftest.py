"""Fixtures for the lab tests: a tiny LLaMA (2 layers, d=64, SmolLM2's tokenizer) as an HF directory, and
small grids over it. Its evaluations take well under a second each, so whole grids run end to end."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# MLflow and lm-eval's hub clients must never reach for the network in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_path) -> Path:
    """A 2-layer LLaMA with fixed random weights and SmolLM2's tokenizer (context 512), as an HF directory."""
    from tests.tiny import write_tiny_smollm_dir

    return write_tiny_smollm_dir(tmp_path_factory.mktemp("lab") / "tiny-llama", smollm_path, context=512)


# Two quantized cells share one artifact (they differ only in the evaluation dtype); one cell runs the
# model's own weights. Perplexity and the cloze task are deterministic on one thread.
TINY_GRID = """
name: tiny
options:
  model: {model}
  threads: 1
sweep:
  - quant.method: rtn
    quant.bits: [4]
    quant.group_size: 32
    dtype: [fp32, bf16]
include:
  - {{label: base, quant.method: none}}
evals:
  ppl: {{data: alice_heldout, seq_len: 64, max_windows: 3}}
  ppl@long: {{data: alice_heldout, seq_len: 128, max_windows: 1}}   # a second evaluation of one kind
  choice: {{task: alice_cloze_heldout, limit: 8}}
"""


def write_grid(folder: Path, text: str, model: Path, name: str = "grid.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).format(model=model))
    return path


@pytest.fixture
def tiny_grid(tmp_path, tiny_model_dir) -> Path:
    return write_grid(tmp_path / "g", TINY_GRID, tiny_model_dir)


# Metrics that measure time vary between two runs of the same cell; everything else must be identical.
TIMING = ("seconds", "per_s", "rss")


def dump(db: Path | str) -> dict:
    """A database's results (a SQLite file or any SQLAlchemy URL), minus timings and run bookkeeping: what
    two runs of one grid must share."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db if isinstance(db, str) and "://" in db else f"sqlite:///{db}")
    with engine.connect() as con:
        rows = lambda sql: [tuple(r) for r in con.execute(text(sql))]  # noqa: E731
        cells = {
            cid: (key, status, settings, artifact, error)
            for cid, key, status, settings, artifact, error in rows(
                "select id, key, status, settings_json, artifact_key, error from cells"
            )
        }
        out: dict = {
            key: {"cell": (status, settings, artifact, error), "metrics": {}}
            for key, status, settings, artifact, error in cells.values()
        }
        for cid, ev, name, value, value_json in rows(
            "select cell_id, eval, name, value, value_json from metrics"
        ):
            if not any(t in name for t in TIMING):
                out[cells[cid][0]]["metrics"][f"{ev}.{name}"] = value if value is not None else value_json
        out["_evaluations"] = sorted(
            rows("select c.key, e.eval, e.eval_key from evaluations e join cells c on c.id = e.cell_id")
        )
        out["_artifacts"] = sorted(rows("select key, kind, made_of_json, status from artifacts"))
    engine.dispose()
    return out


def lab_cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "llamalab.cli", "lab", *args]


# Three cells, one artifact shared by two of them (the tiny grid with cheaper evaluations): each cell of a
# local or Ray run starts a fresh process, which dominates the time of these tests.
THREE_CELLS = TINY_GRID.replace("max_windows: 3", "max_windows: 2").replace("limit: 8", "limit: 4")
