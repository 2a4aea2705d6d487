"""Cells read back from the database as flat rows, and pivot tables of any metric over any two axes.

A row answers `get(name)` for a setting (`quant.bits`), a metric (`eval.name`: `ppl.ppl`,
`choice.acc`, `model.bits_per_weight`, `speed.decode_tokens_per_s`) or a column (`label`, `status`,
`threads`, `origin`). Only the grid's current cells are read, in grid order.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import LlamalabError

COLUMNS = ("label", "status", "error", "origin", "threads", "seconds", "artifact_key", "key", "ordinal")


@dataclass
class Row:
    key: str
    ordinal: int
    label: str
    status: str
    error: str | None
    origin: str
    threads: int | None
    seconds: float | None
    artifact_key: str | None
    settings: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.settings:
            return self.settings[name]
        if name in self.metrics:
            return self.metrics[name]
        if name in COLUMNS:
            return getattr(self, name)
        return default


def load_rows(store, grid, keys: list[str] | None = None) -> list[Row]:
    """The grid's cells (all of its current ones unless `keys`), with every metric, in grid order."""
    from sqlalchemy import select

    tc, tm = store.t["cells"], store.t["metrics"]
    wanted = keys if keys is not None else [c.key for c in grid.cells]
    order = {k: i for i, k in enumerate(wanted)}
    if not store.exists():
        return []
    with store.engine.connect() as c:
        cells = c.execute(select(tc).where(tc.c.grid == grid.name)).mappings().all()
        cells = [r for r in cells if r["key"] in order]
        ids = [r["id"] for r in cells]
        metrics = c.execute(select(tm).where(tm.c.cell_id.in_(ids))).mappings().all() if ids else []
    by_id: dict[int, dict[str, Any]] = {}
    for m in metrics:
        v = m["value"] if m["value"] is not None else json.loads(m["value_json"]) if m["value_json"] else None
        by_id.setdefault(m["cell_id"], {})[f"{m['eval']}.{m['name']}"] = v
    labels = {c.key: c.label for c in grid.cells}
    rows = [
        Row(
            r["key"],
            order[r["key"]],
            labels.get(r["key"], r["label"] or ""),
            r["status"],
            r["error"],
            r["origin"],
            r["threads"],
            r["seconds"],
            r["artifact_key"],
            json.loads(r["settings_json"]),
            by_id.get(r["id"], {}),
        )
        for r in cells
    ]
    return sorted(rows, key=lambda r: r.ordinal)


def known_names(rows: list[Row]) -> list[str]:
    names = {k for r in rows for k in r.settings} | {k for r in rows for k in r.metrics}
    return sorted(names) + list(COLUMNS)


def _check_name(rows: list[Row], name: str, what: str) -> None:
    if rows and not any(r.get(name) is not None for r in rows) and name not in COLUMNS:
        names = [n for n in known_names(rows) if n not in COLUMNS]
        raise LlamalabError(f"{what} {name!r} is in no cell of this grid; known: {', '.join(names)}")


def pivot(rows: list[Row], metric: str, row_axis: str, col_axis: str | None):
    """(row values, column values, {(r, c): value}) over finished cells; two cells in one slot (an axis
    not pinned by `--where`) is an error naming the axes that still vary."""
    rows = [r for r in rows if r.status == "done"]
    for name, what in ((metric, "metric"), (row_axis, "--rows"), (col_axis, "--cols")):
        if name:
            _check_name(rows, name, what)
    table: dict[tuple, Any] = {}
    owner: dict[tuple, Row] = {}
    rvals: list = []
    cvals: list = []
    for r in rows:
        rv, cv = _key(r.get(row_axis)), _key(r.get(col_axis)) if col_axis else ""
        if (rv, cv) in table:
            other = owner[(rv, cv)]
            differ = sorted(
                k for k in set(r.settings) | set(other.settings) if r.settings.get(k) != other.settings.get(k)
            )
            raise LlamalabError(
                f"cells {other.label!r} and {r.label!r} fall in one slot ({row_axis}={rv}"
                f"{f', {col_axis}={cv}' if col_axis else ''}); pin {', '.join(differ)} with --where KEY=VALUE"
            )
        table[(rv, cv)] = r.get(metric)
        owner[(rv, cv)] = r
        if rv not in rvals:
            rvals.append(rv)
        if cv not in cvals:
            cvals.append(cv)
    return rvals, cvals, table


def _key(v: Any) -> Any:
    return "-" if v is None else v


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def to_markdown(rvals, cvals, table, row_axis: str, col_axis: str | None, metric: str) -> str:
    head = [f"{row_axis} \\ {col_axis}" if col_axis else row_axis] + (
        [str(c) for c in cvals] if col_axis else [metric]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rv in rvals:
        lines.append("| " + " | ".join([str(rv)] + [fmt(table.get((rv, cv))) for cv in cvals]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rvals, cvals, table, row_axis: str, col_axis: str | None, metric: str) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([row_axis] + ([str(c) for c in cvals] if col_axis else [metric]))
    for rv in rvals:
        w.writerow([rv] + [table.get((rv, cv), "") for cv in cvals])
    return out.getvalue()


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is better (perplexity, NLL, bytes, bits, seconds, errors)."""
    name = metric.rsplit(".", 1)[-1]
    return (
        any(w in name for w in ("ppl", "nll", "bytes", "bits", "seconds", "error", "rss"))
        and "per_s" not in name
    )
