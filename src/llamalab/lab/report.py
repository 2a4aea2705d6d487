"""One self-contained HTML page per grid, and markdown pages written from a grid's Jinja templates.

The HTML page holds the grid file, the runs and their environment, every cell with its settings and
metrics, the pivot tables and Pareto plots the grid's `report:` section declares (inline SVG, so the file
stands alone), the papers' reference figures beside ours, and every failed cell's error.

Markdown templates (`report: {markdown: [{template, out}]}`, paths relative to the grid) see `rows` (the
grid's cells in order, each with `.get(name)`), `by_label`, `refs(row)` (the grid's reference entries that
match it), `grid`, `runs`, and the filters `fmt` and `fmt_ppl`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.lab.grid import Grid, _matches
from llamalab.lab.results import Row, fmt, load_rows, pivot, to_markdown

QUALITY = ("ppl.ppl", "choice.acc", "passkey.mean_accuracy", "needle.accuracy")
COSTS = ("model.bits_per_weight", "model.weight_bytes", "speed.decode_tokens_per_s", "memory.total_bytes")


def fmt_ppl(x: Any) -> str:
    """The quantization study's perplexity format: two decimals, scientific from 1000 up."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:.1e}"


def refs(grid: Grid, row: Row) -> list[dict[str, Any]]:
    """The grid's reference entries whose `match` fits this cell (`label` may be matched too)."""
    out = []
    for ref in grid.references:
        match = dict(ref.get("match") or {})
        label = match.pop("label", None)
        if (label is None or label == row.label) and _matches(row.settings, match):
            out.append(ref)
    return out


def runs(store, grid: Grid) -> list[dict[str, Any]]:
    from sqlalchemy import select

    r = store.t["runs"]
    with store.engine.connect() as c:
        return [
            dict(x) for x in c.execute(select(r).where(r.c.grid == grid.name).order_by(r.c.id)).mappings()
        ]


def render_markdown(grid: Grid, store) -> list[Path]:
    """Write every markdown page the grid's `report.markdown` declares; returns the paths written."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from llamalab.eval.report import atomic_write

    pages = grid.report.get("markdown") or []
    pages = [pages] if isinstance(pages, dict) else pages
    if not pages:
        raise LlamalabError(
            f"{grid.path.name}: declares no markdown pages (report: {{markdown: [{{template, out}}]}})"
        )
    rows = load_rows(store, grid)
    env = SandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    env.filters.update(fmt=fmt, fmt_ppl=fmt_ppl)
    written = []
    for page in pages:
        template = grid.base / page["template"]
        if not template.is_file():
            raise LlamalabError(f"{template}: no such report template")
        text = env.from_string(template.read_text(encoding="utf-8")).render(
            rows=rows,
            by_label={r.label: r for r in rows},
            refs=lambda row: refs(grid, row),
            grid=grid,
            runs=runs(store, grid),
        )
        out = (grid.base / page["out"]).resolve()
        atomic_write(out, text.encode())
        written.append(out)
    return written


def _table(headers: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _md_to_html_table(md: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in md.strip().splitlines()]
    return _table(
        [c.strip() for c in lines[0]], [[html.escape(c.strip()) for c in line] for line in lines[2:]]
    )


def _plots(grid: Grid, rows: list[Row]) -> list[tuple[dict[str, Any], str]]:
    from llamalab.lab.plots import plot_pareto

    declared = (grid.report.get("plots") or []) if isinstance(grid.report, dict) else []
    if not declared:  # every quality metric the cells have against every cost axis they have
        have = {k for r in rows for k in r.metrics}
        declared = [{"y": y, "x": x} for y in QUALITY if y in have for x in COSTS if x in have]
    out = []
    for spec in declared:
        subset = [r for r in rows if _matches(r.settings, spec.get("where") or {})]
        svg: list[str] = []
        try:
            plot_pareto(
                subset,
                spec["y"],
                spec["x"],
                spec.get("series"),
                [],
                spec.get("title", ""),
                spec.get("log_y"),
                spec.get("log_x", False),
                spec.get("y_cap"),
                svg,
            )
        except LlamalabError as e:
            svg = [f"<p>{html.escape(str(e))}</p>"]
        out.append((spec, svg[0]))
    return out


def html_report(grid: Grid, store) -> str:
    """The whole report as one HTML string (see the module docstring)."""
    rows = load_rows(store, grid)
    varying = sorted(
        {k for r in rows for k in r.settings if len({repr(x.settings.get(k)) for x in rows}) > 1}
    )
    metric_names = sorted(
        {
            k
            for r in rows
            for k, v in r.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    parts = [
        f"<h1>{html.escape(grid.name)}</h1>",
        f"<p>{html.escape(grid.description)}</p>" if grid.description else "",
    ]
    by = {s: sum(r.status == s for r in rows) for s in ("done", "failed")}
    pending = len(grid.cells) - by["done"] - by["failed"]
    parts.append(
        f"<p>{len(grid.cells)} cells: {by['done']} done, {by['failed']} failed, {pending} pending. Database "
        f"<code>{html.escape(store.url)}</code>; "
        f"written {_dt.datetime.now().isoformat(timespec='seconds')}.</p>"
    )
    parts.append("<h2>Runs</h2>")
    parts.append(
        _table(
            ["run", "started", "finished", "status", "executor", "workers", "host", "command"],
            [
                [
                    str(r["id"]),
                    r["started"] or "",
                    r["finished"] or "",
                    r["status"] or "",
                    html.escape(r["executor"] or ""),
                    str(r["workers"]),
                    html.escape(r["host"] or ""),
                    f"<code>{html.escape(r['command'] or '')}</code>",
                ]
                for r in runs(store, grid)
            ],
        )
    )
    parts.append("<h2>Cells</h2>")
    headers = ["label", "status", "origin", "threads", *varying, *metric_names]
    body = [
        [
            html.escape(r.label),
            r.status,
            html.escape(r.origin or ""),
            str(r.threads or ""),
            *[html.escape(str(r.settings.get(k, ""))) for k in varying],
            *[fmt(r.metrics.get(m)) for m in metric_names],
        ]
        for r in rows
    ]
    parts.append(f'<div class="wide">{_table(headers, body)}</div>')
    for spec in grid.report.get("tables") or []:
        subset = [r for r in rows if _matches(r.settings, spec.get("where") or {})]
        rv, cv, t = pivot(subset, spec["metric"], spec["rows"], spec.get("cols"))
        parts.append(
            f"<h2>{html.escape(spec['metric'])} by {html.escape(spec['rows'])}"
            f"{' x ' + html.escape(spec['cols']) if spec.get('cols') else ''}</h2>"
        )
        parts.append(
            _md_to_html_table(to_markdown(rv, cv, t, spec["rows"], spec.get("cols"), spec["metric"]))
        )
    parts.append("<h2>Plots</h2>")
    for spec, svg in _plots(grid, rows):
        parts.append(f"<h3>{html.escape(spec['y'])} against {html.escape(spec['x'])}</h3><div>{svg}</div>")
    ref_rows = [
        [html.escape(r.label), html.escape(str(ref.get("source", ""))), html.escape(k), fmt(r.get(k)), fmt(v)]
        for r in rows
        for ref in refs(grid, r)
        for k, v in (ref.get("metrics") or {}).items()
    ]
    if ref_rows:
        parts.append("<h2>Reference figures</h2>")
        parts.append(_table(["cell", "source", "metric", "ours", "reference"], ref_rows))
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        parts.append("<h2>Failed cells</h2>")
        parts.append(
            _table(["cell", "error"], [[html.escape(r.label), html.escape(r.error or "")] for r in failed])
        )
    parts.append("<h2>Environment</h2>")
    parts.append(f"<pre>{html.escape(json.dumps(_environment(store, grid), indent=1))}</pre>")
    parts.append("<h2>Grid file</h2>")
    parts.append(f"<pre>{html.escape(grid.text)}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}.wide{overflow-x:auto}"
        "pre{background:#f6f6f6;padding:.5em;overflow-x:auto}svg{max-width:100%;height:auto}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(grid.name)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _environment(store, grid: Grid) -> dict[str, Any]:
    """The environments the grid's cells ran in, with their library versions."""
    from sqlalchemy import select

    te, tv, tc = store.t["environments"], store.t["versions"], store.t["cells"]
    with store.engine.connect() as c:
        ids = {
            r[0]
            for r in c.execute(select(tc.c.environment_id).where(tc.c.grid == grid.name))
            if r[0] is not None
        }
        out = {}
        for env in c.execute(select(te).where(te.c.id.in_(ids))).mappings():
            versions = {
                v.library: v.version for v in c.execute(select(tv).where(tv.c.environment_id == env["id"]))
            }
            out[f"environment {env['id']}"] = {
                **{k: env[k] for k in ("host", "platform", "cpu", "logical_cpus", "memory_gib", "device")},
                "versions": versions,
            }
    return out
