"""Quality against cost, one series per value of an axis, with the Pareto front marked (PNG and SVG).

A point is on the front when no other point is at least as good on both axes and better on one; which
direction is better comes from the metric's name (`results.lower_is_better`: perplexity, bits, bytes,
seconds down; accuracy, tokens/s up). The front is drawn as a dashed step line through ringed points,
each labelled with its cell.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.lab.results import Row, lower_is_better


def pareto_front(
    points: list[tuple[float, float, Any]], x_lower: bool, y_lower: bool
) -> list[tuple[float, float, Any]]:
    """The non-dominated points, sorted by x (better x first)."""

    def better_or_equal(a: float, b: float, lower: bool) -> bool:
        return a <= b if lower else a >= b

    front = []
    for p in points:
        dominated = any(
            better_or_equal(q[0], p[0], x_lower)
            and better_or_equal(q[1], p[1], y_lower)
            and (q[0], q[1]) != (p[0], p[1])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p[0], reverse=not x_lower)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_pareto(
    rows: list[Row],
    y: str,
    x: str,
    series: str | None,
    outs: list[Path],
    title: str = "",
    log_y: bool | None = None,
    log_x: bool = False,
    y_cap: float | None = None,
    svg: list[str] | None = None,
) -> list[tuple[float, float, str]]:
    """Draw `y` against `x` for every finished cell into each of `outs` (and, when `svg` is a list, append
    the SVG text to it, for the HTML report); returns the Pareto front as (x, y, label)."""
    from llamalab.eval.report import _pyplot, _save

    pts = [(r.get(x), r.get(y), r) for r in rows if r.status == "done"]
    pts = [(float(a), float(b), r) for a, b, r in pts if _finite(a) and _finite(b)]
    if not pts:
        raise LlamalabError(
            f"no finished cell has both {x!r} and {y!r} as numbers; see `llamalab lab status`"
        )
    if y_cap is not None:
        pts = [(a, min(b, y_cap), r) for a, b, r in pts]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list] = {}
    for a, b, r in pts:
        groups.setdefault(str(r.get(series, "(none)")) if series else "cells", []).append((a, b))
    colors = [*plt.get_cmap("tab10").colors, "black", "olive", "teal", "navy"]
    for i, (name, g) in enumerate(sorted(groups.items())):
        g.sort()
        ax.plot(
            [a for a, _ in g],
            [b for _, b in g],
            marker="os^Dv<>p"[i % 8],
            ms=5,
            lw=0.8,
            color=colors[i % len(colors)],
            label=name,
        )
    x_lower, y_lower = lower_is_better(x), lower_is_better(y)
    front = pareto_front([(a, b, r) for a, b, r in pts], x_lower, y_lower)
    fx, fy = [p[0] for p in front], [p[1] for p in front]
    ax.step(fx, fy, where="post", color="k", ls="--", lw=1, label="Pareto front")
    ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="k", linewidths=1.2, zorder=5)
    for (a, b, _), text in zip(front, point_names([r.label for _, _, r in front], series)):
        ax.annotate(text, (a, b), textcoords="offset points", xytext=(4, 4), fontsize=6)
    if (
        log_y
        if log_y is not None
        else (min(p[1] for p in pts) > 0 and max(p[1] for p in pts) / min(p[1] for p in pts) > 50)
    ):
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{x} ({'lower' if x_lower else 'higher'} is better)")
    ax.set_ylabel(
        f"{y} ({'lower' if y_lower else 'higher'} is better)" + (f", capped at {y_cap:g}" if y_cap else "")
    )
    ax.set_title(title or f"{y} against {x}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    for out in outs:
        _save(fig, Path(out))
    if svg is not None:
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
        svg.append(buf.getvalue())
    plt.close(fig)
    return [(a, b, r.label) for a, b, r in front]


def point_names(labels: list[str], series: str | None) -> list[str]:
    """Labels of the marked points shortened to what tells them apart: a `key=value` word is dropped when
    every marked label that sets that key gives it the same value, and so is the series (the legend shows
    it); a label left empty is kept whole."""
    words = [label.split() for label in labels]
    values: dict[str, set[str]] = {}
    for w in (w for ws in words for w in ws if "=" in w):
        values.setdefault(w.split("=", 1)[0], set()).add(w)
    same = {k for k, v in values.items() if len(v) == 1 and len(labels) > 1}
    drop = lambda w: "=" in w and (w.split("=", 1)[0] in same or w.split("=", 1)[0] == series)  # noqa: E731
    return [" ".join(w for w in ws if not drop(w)) or label for ws, label in zip(words, labels)]


def out_paths(out: Path) -> list[Path]:
    """`plot.png` / `plot.svg` as given; a name without .png/.svg gets both."""
    if out.suffix.lower() in (".png", ".svg"):
        return [out]
    return [out.with_name(out.name + ".png"), out.with_name(out.name + ".svg")]
