"""The read side of `llamalab lab`: table, plot, report, export (registered on the `lab` group by cli.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from llamalab.errors import LlamalabError

GridArg = Annotated[Path, typer.Argument(help="The grid file (YAML).", show_default=False)]
DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL or SQLite file (default: GRID.db).")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", "-w", help="Only cells with KEY=VALUE (a setting or label; YAML list = any of)."),
]


def register(app: typer.Typer, open_grid: Callable) -> None:
    def rows_for(grid_file: Path, db: str | None, where: list[str] | None):
        from llamalab.lab.results import load_rows
        from llamalab.lab.runner import parse_where, select

        grid, store = open_grid(grid_file, db)
        keys = [c.key for c in select(grid, parse_where(where))]
        return grid, store, load_rows(store, grid, keys)

    @app.command()
    def table(
        grid_file: GridArg,
        metric: Annotated[str, typer.Option("--metric", "-m", help="eval.name (ppl.ppl, choice.acc, ...).")],
        rows: Annotated[
            str, typer.Option("--rows", "-r", help="Setting (or label) along the rows.")
        ] = "label",
        cols: Annotated[str | None, typer.Option("--cols", "-c", help="Setting along the columns.")] = None,
        fmt: Annotated[str, typer.Option("--format", help="md or csv.")] = "md",
        out: Annotated[
            Path | None, typer.Option("--out", "-o", help="Write here instead of printing.")
        ] = None,
        where: WhereOpt = None,
        db: DbOpt = None,
    ) -> None:
        """Pivot one metric over one or two axes (finished cells), as markdown or CSV."""
        from llamalab.eval.report import atomic_write
        from llamalab.lab.results import pivot, to_csv, to_markdown

        if fmt not in ("md", "csv"):
            raise LlamalabError(f"--format {fmt!r}: use md or csv")
        _, _, found = rows_for(grid_file, db, where)
        rv, cv, t = pivot(found, metric, rows, cols)
        text = (to_markdown if fmt == "md" else to_csv)(rv, cv, t, rows, cols, metric)
        if out:
            atomic_write(out, text.encode())
            print(f"wrote {out}")
        else:
            print(text, end="")

    @app.command()
    def plot(
        grid_file: GridArg,
        out: Annotated[
            Path, typer.Option("--out", "-o", help="x.png, x.svg, or a name without suffix for both.")
        ],
        y: Annotated[str, typer.Option("--y", help="Quality metric (ppl.ppl, choice.acc, ...).")] = "ppl.ppl",
        x: Annotated[
            str,
            typer.Option(
                "--x", help="Cost: model.bits_per_weight, model.weight_bytes, speed.decode_tokens_per_s, ..."
            ),
        ] = "model.bits_per_weight",
        series: Annotated[str | None, typer.Option(help="One line per value of this setting.")] = None,
        title: Annotated[str, typer.Option(help="Plot title.")] = "",
        log_y: Annotated[
            bool | None, typer.Option("--log-y/--linear-y", help="Default: log if spread > 50x.")
        ] = None,
        log_x: Annotated[bool, typer.Option("--log-x", help="Log-2 x axis (bits from 1 to 32).")] = False,
        y_cap: Annotated[
            float | None, typer.Option(help="Clip y at this value (perplexity blow-ups).")
        ] = None,
        where: WhereOpt = None,
        db: DbOpt = None,
    ) -> None:
        """Quality against bits per weight, bytes in memory or tokens/s, with the Pareto front marked."""
        from llamalab.lab.plots import out_paths, plot_pareto

        grid, _, found = rows_for(grid_file, db, where)
        paths = out_paths(out)
        front = plot_pareto(
            found, y, x, series, paths, title or f"{grid.name}: {y} against {x}", log_y, log_x, y_cap
        )
        print(
            f"wrote {', '.join(map(str, paths))}; Pareto front: " + ", ".join(label for _, _, label in front)
        )

    @app.command()
    def report(
        grid_file: GridArg,
        out: Annotated[
            Path | None, typer.Option("--out", "-o", help="The HTML page (default: GRID.html).")
        ] = None,
        markdown: Annotated[
            bool,
            typer.Option("--markdown", help="Write the grid's markdown pages (report.markdown) instead."),
        ] = False,
        db: DbOpt = None,
    ) -> None:
        """One self-contained HTML page (grid, runs, cells, tables, Pareto plots, reference figures)."""
        from llamalab.eval.report import atomic_write
        from llamalab.lab.report import html_report, render_markdown

        grid, store = open_grid(grid_file, db)
        if markdown:
            for path in render_markdown(grid, store):
                print(f"wrote {path}")
            return
        path = out or grid.path.with_suffix(".html")
        atomic_write(path, html_report(grid, store).encode())
        print(f"wrote {path}")

    @app.command()
    def export(
        grid_file: GridArg,
        mlflow: Annotated[
            str, typer.Option("--mlflow", help="Tracking URI: http://server:5000 or a directory.")
        ],
        experiment: Annotated[
            str | None, typer.Option(help="MLflow experiment (default: the grid's name).")
        ] = None,
        db: DbOpt = None,
    ) -> None:
        """Export every finished or failed cell as an MLflow run (params, metrics, tags)."""
        from llamalab.lab.mlflow_export import export as do_export

        grid, store = open_grid(grid_file, db)
        created, skipped = do_export(grid, store, mlflow, experiment)
        print(
            f"exported {created} cells to {mlflow} (experiment {experiment or grid.name}); "
            f"{skipped} were there"
        )
