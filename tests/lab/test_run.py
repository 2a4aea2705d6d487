"""A small grid over a tiny model end to end: the numbers are the direct calls' numbers, the shared artifact
is built once, finished cells are never repeated, a failing cell is recorded and the others finish."""

from __future__ import annotations

import json
import sqlite3

import pytest

from llamalab.lab.grid import load_grid
from llamalab.lab.results import load_rows
from llamalab.lab.runner import run_grid
from llamalab.lab.store import Store

from .conftest import write_grid


def _rows(grid):
    return {r.label: r for r in load_rows(Store(grid.default_db_url()), grid)}


def test_grid_runs_end_to_end_with_the_direct_calls_numbers_and_one_shared_artifact(
    tiny_grid, tiny_model_dir
):
    grid = load_grid(tiny_grid)
    summary = run_grid(grid, workers=0, progress=False)
    assert (summary.done, summary.failed, summary.artifacts_built) == (3, 0, 1)
    rows = _rows(grid)
    fp32, bf16, base = (
        rows["dtype=fp32 bits=4 group_size=32 method=rtn"],
        rows["dtype=bf16 bits=4 group_size=32 method=rtn"],
        rows["base"],
    )
    # one artifact for both quantized cells: one row, one folder, one key
    assert fp32.artifact_key == bf16.artifact_key is not None and base.artifact_key is None
    con = sqlite3.connect(grid.default_db_url().removeprefix("sqlite:///"))
    assert con.execute("select count(*) from artifacts").fetchone() == (1,)
    assert [p.name for p in grid.artifact_root().iterdir()] == [f"quantized-{fp32.artifact_key}"]
    # the lab's numbers are the direct calls' numbers on the same model
    import torch

    import llamalab
    from llamalab.eval.choice import cloze_docs, evaluate_choice
    from llamalab.eval.perplexity import perplexity
    from llamalab.quant.calib import alice_split

    torch.set_num_threads(1)
    for row, path in (
        (base, tiny_model_dir),
        (fp32, grid.artifact_root() / f"quantized-{fp32.artifact_key}"),
    ):
        llm = llamalab.load(str(path))
        ids = llm.encode(alice_split()[1], add_special_tokens=False)
        assert row.get("ppl.ppl") == perplexity(llm, ids, 64, max_windows=3, progress=False).ppl
        assert row.get("ppl@long.ppl") == perplexity(llm, ids, 128, max_windows=1, progress=False).ppl
        c = evaluate_choice(llm, cloze_docs(alice_split()[1], n=1000)[:8], progress=False)
        assert (row.get("choice.acc"), row.get("choice.acc_norm")) == (c.acc, c.acc_norm)
        assert row.get("model.weight_bytes") == llm.model.weight_bytes()
    assert fp32.get("model.bits_per_weight") == pytest.approx(
        4.625
    )  # 4-bit codes + fp16 scale and zero per 32
    assert base.get("model.bits_per_weight") == 32 and bf16.get("model.weight_bytes") < fp32.get(
        "model.weight_bytes"
    )
    # settings, versions and machine are recorded
    assert con.execute(
        "select count(*) from settings where cell_id = (select id from cells where label='base')"
    ).fetchone() == (2,)
    assert dict(con.execute("select library, version from versions").fetchall())["torch"] == torch.__version__
    assert con.execute("select status, executor from runs").fetchall() == [("finished", "inline")]

    # again: nothing runs; a changed evaluation runs that evaluation alone
    assert run_grid(grid, workers=0, progress=False).skipped == 3
    before = {r.label: r.get("ppl.ppl") for r in _rows(grid).values()}
    tiny_grid.write_text(tiny_grid.read_text().replace("limit: 8", "limit: 4"))
    grid2 = load_grid(tiny_grid)
    s2 = run_grid(grid2, workers=0, progress=False)
    assert (s2.done, s2.artifacts_reused, s2.artifacts_built) == (3, 1, 0)
    params = {
        json.loads(p)["limit"]
        for (p,) in con.execute("select params_json from evaluations where eval='choice'")
    }
    assert params == {4}
    assert {r.label: r.get("ppl.ppl") for r in _rows(grid2).values()} == before
    assert con.execute("select count(*) from evaluations where eval='ppl'").fetchone() == (3,)


FAILING = """
name: failing
options: {{model: {model}, threads: 1}}
include:
  - {{label: ok, quant.method: rtn, quant.bits: 8}}
  - {{label: rejected, quant.method: rtn, quant.bits: 9}}
  - {{label: bad-group, quant.method: rtn, quant.bits: 4, quant.group_size: 48}}
  - {{label: too-long, quant.method: none, dtype: bf16}}
evals:
  ppl: {{data: alice_heldout, seq_len: 600, max_windows: 1}}
"""


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, tiny_model_dir):
    grid = load_grid(write_grid(tmp_path, FAILING, tiny_model_dir))
    summary = run_grid(grid, workers=0, progress=False)
    rows = _rows(grid)
    assert {k: r.status for k, r in rows.items()} == {
        "ok": "failed",
        "rejected": "failed",
        "bad-group": "failed",
        "too-long": "failed",
    }
    # the tiny model's context is 512: every cell fails for its own reason, recorded as one line
    assert "out of range" in rows["rejected"].error
    assert "does not divide the input width 64" in rows["bad-group"].error and rows[
        "bad-group"
    ].error.startswith("artifact ")
    assert "beyond the model's context of 512" in rows["too-long"].error
    assert summary.failed == 4 and all("\n" not in r.error for r in rows.values())
    # fix the evaluation: the failed cells stay failed until asked to retry; then the fixable ones finish
    path = grid.path
    path.write_text(path.read_text().replace("seq_len: 600", "seq_len: 64"))
    grid = load_grid(path)
    assert run_grid(grid, workers=0, progress=False).skipped == 4
    s = run_grid(grid, workers=0, progress=False, retry_failed=True)
    rows = _rows(grid)
    assert {k: r.status for k, r in rows.items()} == {
        "ok": "done",
        "rejected": "failed",
        "bad-group": "failed",
        "too-long": "done",
    }
    assert s.done == 2 and rows["ok"].error is None and rows["ok"].get("ppl.ppl") > 1


def test_only_the_selected_cells_run_and_db_may_be_a_plain_path(tiny_grid, tmp_path):
    from llamalab.lab.runner import parse_where

    grid = load_grid(tiny_grid)
    db = tmp_path / "elsewhere" / "results.db"
    s = run_grid(grid, str(db), workers=0, progress=False, where=parse_where(["label=base"]))
    assert (s.done, s.artifacts_built) == (1, 0) and s.db == f"sqlite:///{db}"
    rows = {r.label: r for r in load_rows(Store(str(db)), grid)}
    assert rows["base"].status == "done" and sum(r.status == "pending" for r in rows.values()) == 2
    assert not tiny_grid.with_suffix(".db").exists()
