"""Bring the quantization study's earlier results into its lab database, labelled as imported.

Before the lab, `experiments/quant_study.py` computed each row of `docs/results/quant_study.md` and appended
it to `docs/results/quant_study.jsonl` (the last record of a name is the one the table showed). Re-running
every row takes hours on 2 cores, so this script records those results in the grid's database instead,
each cell with `origin = "import: docs/results/quant_study.jsonl"` and the thread count it ran with, under
a run whose executor is `import`. The metrics are the script's, unchanged: bits per weight, quantization
time, perplexity (its tokens and windows) and the cloze task's accuracy.

A cell the lab has already computed is never overwritten: the script's record of that row is attached to it
as the extra evaluation `script` instead, so the page can show both side by side. Run it after `lab run`
(it refuses while a run of the grid is live):

    .venv/bin/python experiments/import_quant_study.py
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "experiments" / "quant_study.yaml"
JSONL = ROOT / "docs" / "results" / "quant_study.jsonl"
ORIGIN = "import: docs/results/quant_study.jsonl"


def last_records() -> dict[str, dict]:
    records = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    return {r["name"]: r for r in records}  # later records of a name replace earlier ones, as the script did


def evals_of(rec: dict, keys: dict[str, str]) -> dict[str, dict]:
    """The script's record as the lab's evaluations (only what the script measured)."""
    return {
        "model": {
            "eval_key": "model",
            "metrics": {"bits_per_weight": rec["bpw"], "quantize_seconds": rec["quantize_s"]},
        },
        "ppl": {
            "eval_key": keys["ppl"],
            "metrics": {
                "ppl": rec["ppl"],
                "tokens": rec["eval_tokens"],
                "windows": rec["windows"],
                "seconds": rec["eval_s"],
            },
        },
        "choice": {
            "eval_key": keys["choice"],
            "metrics": {
                "acc": rec["choice_acc"],
                "acc_stderr": rec["choice_acc_stderr"],
                "acc_norm": rec["choice_acc_norm"],
                "docs": rec["choice_docs"],
            },
        },
    }


def main() -> int:
    from llamalab.errors import LlamalabError
    from llamalab.lab.grid import load_grid
    from llamalab.lab.store import Store

    grid = load_grid(GRID)
    store = Store(grid.default_db_url())
    store.create()
    if store.live_run(grid.name):
        raise LlamalabError(f"a run of {grid.name} is live; import when it has finished")
    keys = {e.name: e.key for e in grid.evals}
    states = store.sync_cells(grid, keys)
    records = last_records()
    run_id = store.start_run(grid, shlex.join(["python", *sys.argv]), "import", 0, {})
    imported = attached = 0
    for cell in grid.cells:
        rec = records.get(cell.label)
        if rec is None or "choice_acc" not in rec:
            continue
        state = states[cell.key]
        if state["status"] == "done" and "script" not in state["done_evals"]:
            script = {
                "ppl": rec["ppl"],
                "choice_acc": rec["choice_acc"],
                "choice_acc_stderr": rec["choice_acc_stderr"],
                "bits_per_weight": rec["bpw"],
                "quantize_seconds": rec["quantize_s"],
                "threads": rec["threads"],
            }
            store.add_evaluation(state["id"], "script", ORIGIN, script)
            attached += 1
        elif state["status"] != "done":
            result = {"status": "done", "threads": rec["threads"], "evals": evals_of(rec, keys)}
            store.record_cell(state["id"], result, run_id, origin=ORIGIN)
            imported += 1
    store.finish_run(run_id, "finished")
    print(
        f"{grid.name}: imported {imported} cells from {JSONL.name}; "
        f"attached the script's record to {attached} lab cells"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - one line for a user running a script
        from llamalab.errors import LlamalabError

        if not isinstance(e, LlamalabError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
