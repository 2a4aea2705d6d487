"""`llamalab lab status`: done / failed / pending of a grid, and a live progress bar while a run writes."""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from llamalab.lab.results import Row, load_rows


def counts(grid, rows: list[Row]) -> dict[str, int]:
    by_key = {r.key: r.status for r in rows}
    out = {"done": 0, "failed": 0, "pending": 0}
    for c in grid.cells:
        out[by_key.get(c.key, "pending")] = out.get(by_key.get(c.key, "pending"), 0) + 1
    return out


def _seconds_since(iso: str) -> float:
    return (_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(iso)).total_seconds()


def summary_lines(grid, store, rows: list[Row]) -> list[str]:
    from sqlalchemy import func, select

    c = counts(grid, rows)
    total = len(grid.cells)
    lines = [
        f"grid {grid.name}: {total} cells, {c['done']} done, {c['failed']} failed, "
        f"{c['pending']} pending ({store.url})"
    ]
    live = store.live_run(grid.name) if store.exists() else None
    if live:
        tc = store.t["cells"]
        with store.engine.connect() as conn:
            finished_here = conn.execute(
                select(func.count()).where(
                    tc.c.grid == grid.name, tc.c.run_id == live["id"], tc.c.status != "pending"
                )
            ).scalar_one()
        elapsed = _seconds_since(live["started"])
        eta = elapsed / finished_here * c["pending"] if finished_here else None
        lines.append(
            f"running: run {live['id']} (pid {live['pid']}, {live['executor']}, since {live['started']}), "
            f"{finished_here} cells finished in {elapsed:.0f} s"
            + (f", about {eta:.0f} s left" if eta is not None else "")
        )
    for r in rows:
        if r.status == "failed":
            lines.append(f"failed {r.label}: {r.error}")
    return lines


def watch(grid, store, interval: float = 2.0, progress: bool | None = None) -> dict[str, Any]:
    """A progress bar (rate, ETA) that follows a running `lab run` until it ends."""
    from tqdm import tqdm

    rows = load_rows(store, grid)
    c = counts(grid, rows)
    bar = tqdm(
        total=len(grid.cells),
        initial=c["done"] + c["failed"],
        unit="cell",
        desc=f"lab {grid.name}",
        disable=None if progress is None else not progress,
    )
    try:
        while True:
            rows = load_rows(store, grid)
            c = counts(grid, rows)
            bar.update(c["done"] + c["failed"] - bar.n)
            bar.set_postfix(done=c["done"], failed=c["failed"], pending=c["pending"])
            if not store.live_run(grid.name) or not c["pending"]:
                return c
            time.sleep(interval)
    finally:
        bar.close()
