"""`llamalab lab ...`: run a grid, watch it, and read its results (tables, plots, report, MLflow export).

Every command takes the grid file; its database is `--db URL` or the grid's own (`GRID.db` beside the file
unless the grid says `database:`). Bad input (an unknown name in the grid, a database from a newer schema,
an unknown metric) is one line on stderr and exit status 1, before any work.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from llamalab.errors import LlamalabError

lab_app = typer.Typer(
    name="lab",
    help="Grids of methods x settings x evaluations: run, resume, tabulate, plot, report, export.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

GridArg = Annotated[Path, typer.Argument(help="The grid file (YAML).", show_default=False)]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="SQLAlchemy URL or SQLite file (default: GRID.db beside the grid file)."),
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", "-w", help="Only cells with KEY=VALUE (a setting or label; YAML list = any of)."),
]


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")


def _open(grid_file: Path, db: str | None, must_exist: bool = True):
    from llamalab.lab.grid import load_grid
    from llamalab.lab.store import Store

    grid = load_grid(grid_file)
    store = Store(db or grid.default_db_url())
    if must_exist and not store.exists():
        raise LlamalabError(f"{store.url}: no results yet; run `llamalab lab run {grid_file}` first")
    return grid, store


@lab_app.command()
def run(
    grid_file: GridArg,
    db: DbOpt = None,
    workers: Annotated[int, typer.Option(help="Local worker processes (0: run cells in this process).")] = 1,
    ray: Annotated[
        str | None,
        typer.Option(help="Run cells as Ray tasks: 'auto' (this machine's cluster), 'local', or an address."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Threads per cell when the grid sets none (default: CPUs / workers).")
    ] = None,
    where: WhereOpt = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run failed cells again.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would run; run nothing.")] = False,
) -> None:
    """Run every cell of the grid that is not finished (resumes a killed run; never repeats a done cell)."""
    from llamalab.lab.grid import load_grid
    from llamalab.lab.runner import parse_where, run_grid

    grid = load_grid(grid_file)
    filters = parse_where(where)
    if dry_run:
        _dry_run(grid, db, filters, retry_failed)
        return
    summary = run_grid(
        grid,
        db,
        workers,
        ray,
        threads,
        filters,
        retry_failed,
        command=shlex.join(["llamalab", *sys.argv[1:]]),
    )
    for line in summary.errors:
        print(f"failed {line}", file=sys.stderr)
    print(
        f"{grid.name}: {summary.done} cells done, {summary.failed} failed, "
        f"{summary.skipped} already finished; "
        f"artifacts {summary.artifacts_built} built, {summary.artifacts_reused} reused ({summary.db})"
    )


def _dry_run(grid, db, filters, retry_failed) -> None:
    from llamalab.lab.runner import plan
    from llamalab.lab.store import Store

    store = Store(db or grid.default_db_url())
    if not store.exists():  # nothing to resume from: plan against an empty in-memory database
        store = Store("sqlite://")
        store.create()
    todo, rejected, skipped = plan(grid, store, filters, retry_failed)
    artifacts = {a.key for p in todo for a in p.artifacts}
    for p in todo:
        art = "".join(f"  [{a.kind} {a.key[:12]}]" for a in p.artifacts)
        print(f"run  {p.cell.label}{art}")
    for cell, _ in rejected:
        print(f"fail {cell.label}: {cell.error}")
    print(
        f"{len(todo)} cells to run, {len(rejected)} rejected by their method, {skipped} finished; "
        f"{len(artifacts)} artifacts needed; evaluations: {', '.join(e.name for e in grid.evals)}"
    )


@lab_app.command()
def status(
    grid_file: GridArg,
    db: DbOpt = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow a running `lab run` with a progress bar.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between database reads with --watch.")] = 2.0,
) -> None:
    """Done / failed / pending cells, the running run (with its ETA) and every failed cell's error."""
    from llamalab.lab import status as st
    from llamalab.lab.results import load_rows

    grid, store = _open(grid_file, db, must_exist=False)
    if watch and store.exists():
        st.watch(grid, store, interval)
    for line in st.summary_lines(grid, store, load_rows(store, grid)):
        print(line)


def register_read_commands() -> None:
    from llamalab.lab import cli_read

    cli_read.register(lab_app, _open)


register_read_commands()
