"""The results database: schema, version check, and the only code that writes it (the driver's).

SQLite by default (a file beside the grid, WAL journal so `lab status` reads while a run writes); any
SQLAlchemy URL (`postgresql+psycopg://...`) through the same code. Schema (version `SCHEMA_VERSION`):

- `schema_info(key, value)`: `schema_version`. A database written by a newer schema is refused before any
  work; an older one would be migrated here (there is none yet).
- `runs`: one `lab run` invocation: grid name, grid file path, hash and full text, command line, executor
  (`local`, `inline`, `ray`), workers, host, pid, start/finish times, status (`running`, `finished`,
  `interrupted`, `failed`), and the driver's environment.
- `environments` + `versions`: a machine (host, platform, CPU, logical CPUs, memory, device) with the
  library versions that can change a number (llamalab, torch, numpy, tokenizers, ...), one row per library.
- `cells`: one settings combination of one grid, unique by (grid, key): ordinal in the grid, label,
  settings JSON, status (`pending`, `done`, `failed`), error and traceback, the artifact it used, the run and
  environment it ran in, its thread count, start/finish/seconds, and `origin` (`lab`, or `import: ...` for
  results brought in from an earlier tool, labelled as such).
- `settings`: the same settings one row per (cell, name), JSON value, for querying and pivoting.
- `evaluations`: (cell, eval) with the parameters' key and JSON, and its seconds. When a grid changes an
  evaluation's parameters, only that evaluation runs again.
- `metrics`: (cell, eval, name) with a numeric `value` (NULL when the metric is not a number) and the
  JSON of any value. Nested metrics are flattened with dots (`accuracy.1024`).
- `artifacts`: key (content hash), kind, what made it (JSON), path, status, error, build record (JSON),
  build seconds, bytes on disk, the run and environment that built it, when.

A cell's results, its evaluations and its status are written in one transaction when it finishes; a
killed run leaves its unfinished cells `pending` with no metrics.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError

SCHEMA_VERSION = 1


def _tables():
    from sqlalchemy import (
        Column,
        Float,
        ForeignKey,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    md = MetaData()
    t = {}
    t["schema_info"] = Table(
        "schema_info", md, Column("key", String(64), primary_key=True), Column("value", Text)
    )
    t["environments"] = Table(
        "environments",
        md,
        Column("id", Integer, primary_key=True),
        Column("key", String(64), unique=True, nullable=False),
        Column("host", String(255)),
        Column("platform", Text),
        Column("cpu", Text),
        Column("logical_cpus", Integer),
        Column("memory_gib", Float),
        Column("device", String(64)),
    )
    t["versions"] = Table(
        "versions",
        md,
        Column("environment_id", Integer, ForeignKey("environments.id"), primary_key=True),
        Column("library", String(64), primary_key=True),
        Column("version", String(64)),
    )
    t["runs"] = Table(
        "runs",
        md,
        Column("id", Integer, primary_key=True),
        Column("grid", String(255), nullable=False),
        Column("grid_path", Text),
        Column("grid_hash", String(64)),
        Column("grid_text", Text),
        Column("command", Text),
        Column("executor", String(32)),
        Column("workers", Integer),
        Column("host", String(255)),
        Column("pid", Integer),
        Column("started", String(40)),
        Column("finished", String(40)),
        Column("status", String(16)),
        Column("environment_id", Integer, ForeignKey("environments.id")),
    )
    t["cells"] = Table(
        "cells",
        md,
        Column("id", Integer, primary_key=True),
        Column("grid", String(255), nullable=False),
        Column("key", String(64), nullable=False),
        Column("ordinal", Integer),
        Column("label", Text),
        Column("settings_json", Text, nullable=False),
        Column("status", String(16), nullable=False),
        Column("error", Text),
        Column("traceback", Text),
        Column("artifact_key", String(64)),
        Column("run_id", Integer, ForeignKey("runs.id")),
        Column("environment_id", Integer, ForeignKey("environments.id")),
        Column("threads", Integer),
        Column("started", String(40)),
        Column("finished", String(40)),
        Column("seconds", Float),
        Column("origin", Text, nullable=False, default="lab"),
        UniqueConstraint("grid", "key", name="uq_cells_grid_key"),
    )
    t["settings"] = Table(
        "settings",
        md,
        Column("cell_id", Integer, ForeignKey("cells.id"), primary_key=True),
        Column("name", String(255), primary_key=True),
        Column("value_json", Text),
    )
    t["evaluations"] = Table(
        "evaluations",
        md,
        Column("cell_id", Integer, ForeignKey("cells.id"), primary_key=True),
        Column("eval", String(64), primary_key=True),
        Column("eval_key", String(64), nullable=False),
        Column("params_json", Text),
        Column("seconds", Float),
    )
    t["metrics"] = Table(
        "metrics",
        md,
        Column("cell_id", Integer, ForeignKey("cells.id"), primary_key=True),
        Column("eval", String(64), primary_key=True),
        Column("name", String(255), primary_key=True),
        Column("value", Float),
        Column("value_json", Text),
    )
    t["artifacts"] = Table(
        "artifacts",
        md,
        Column("key", String(64), primary_key=True),
        Column("kind", String(32)),
        Column("made_of_json", Text),
        Column("path", Text),
        Column("status", String(16)),
        Column("error", Text),
        Column("info_json", Text),
        Column("seconds", Float),
        Column("bytes", Integer),
        Column("run_id", Integer, ForeignKey("runs.id")),
        Column("environment_id", Integer, ForeignKey("environments.id")),
        Column("created", String(40)),
    )
    return md, t


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'accuracy': {'1024': 1.0}} -> {'accuracy.1024': 1.0}; lists stay whole (stored as JSON)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _json(v: Any) -> str:
    return json.dumps(v, default=str, allow_nan=True)


class Store:
    """One results database. Reading is open to anyone; `lab run`'s driver is the only writer."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine, event

        if "://" not in url:  # a plain path is a SQLite file
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
        self.url = url
        self.sqlite = url.startswith("sqlite")
        # a SQLite file that does not exist yet is only created by create(), never by a read
        self.file = Path(url.split(":///", 1)[1]) if self.sqlite and ":///" in url else None
        if self.file is not None and str(self.file) in ("", ":memory:"):
            self.file = None
        try:
            self.engine = create_engine(url, future=True)
        except Exception as e:  # a malformed URL or a missing driver (psycopg) is the user's to fix
            raise LlamalabError(f"--db {url}: {type(e).__name__}: {e}") from None
        if self.sqlite:

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # WAL: readers (lab status) never block the writer
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

        self.md, self.t = _tables()
        self._check_version()

    # --- schema ---------------------------------------------------------------------------------------
    def _check_version(self) -> None:
        from sqlalchemy import inspect, select
        from sqlalchemy.exc import SQLAlchemyError

        if self.file is not None and not self.file.exists():
            return
        try:
            names = set(inspect(self.engine).get_table_names())
            if "schema_info" in names:
                with self.engine.connect() as c:
                    row = c.execute(
                        select(self.t["schema_info"].c.value).where(
                            self.t["schema_info"].c.key == "schema_version"
                        )
                    ).first()
                found = int(row[0]) if row else 0
                if found > SCHEMA_VERSION:
                    raise LlamalabError(
                        f"{self.url}: written by a newer llamalab (lab schema {found}, this one reads up to "
                        f"{SCHEMA_VERSION}); upgrade llamalab or use another --db"
                    )
            elif names:
                raise LlamalabError(f"{self.url}: not a llamalab lab database (it has other tables)")
        except SQLAlchemyError as e:
            raise LlamalabError(
                f"{self.url}: cannot open the database: {e.__class__.__name__}: {e}"
            ) from None

    def create(self) -> None:
        """Create the tables (idempotent) and stamp the schema version."""
        from sqlalchemy import select

        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        self.md.create_all(self.engine)
        with self.engine.begin() as c:
            si = self.t["schema_info"]
            if c.execute(select(si.c.value).where(si.c.key == "schema_version")).first() is None:
                c.execute(si.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))

    def exists(self) -> bool:
        from sqlalchemy import inspect

        if self.file is not None and not self.file.exists():
            return False
        return "cells" in set(inspect(self.engine).get_table_names())

    # --- environments -------------------------------------------------------------------------------
    def environment_id(self, conn, env: dict[str, Any]) -> int:
        """The id of a machine + library versions, inserted the first time it is seen."""
        from sqlalchemy import select

        from llamalab.lab.settings import content_hash

        te, tv = self.t["environments"], self.t["versions"]
        key = content_hash(env, 32)
        row = conn.execute(select(te.c.id).where(te.c.key == key)).first()
        if row:
            return int(row[0])
        m = env.get("machine", {})
        res = conn.execute(
            te.insert().values(
                key=key,
                host=env.get("host"),
                platform=m.get("platform"),
                cpu=m.get("cpu"),
                logical_cpus=m.get("logical_cpus"),
                memory_gib=m.get("memory_gib"),
                device=m.get("device"),
            )
        )
        env_id = int(res.inserted_primary_key[0])
        for lib, ver in sorted(env.get("versions", {}).items()):
            conn.execute(tv.insert().values(environment_id=env_id, library=lib, version=ver))
        return env_id

    # --- runs ---------------------------------------------------------------------------------------
    def start_run(self, grid, command: str, executor: str, workers: int, env: dict[str, Any]) -> int:
        from llamalab.lab.settings import content_hash

        with self.engine.begin() as c:
            env_id = self.environment_id(c, env)
            res = c.execute(
                self.t["runs"]
                .insert()
                .values(
                    grid=grid.name,
                    grid_path=str(grid.path),
                    grid_hash=content_hash(grid.text, 64),
                    grid_text=grid.text,
                    command=command,
                    executor=executor,
                    workers=workers,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started=now(),
                    status="running",
                    environment_id=env_id,
                )
            )
            return int(res.inserted_primary_key[0])

    def finish_run(self, run_id: int, status: str) -> None:
        with self.engine.begin() as c:
            r = self.t["runs"]
            c.execute(r.update().where(r.c.id == run_id).values(finished=now(), status=status))

    def live_run(self, grid_name: str) -> dict[str, Any] | None:
        """A run of this grid still marked running whose driver is alive on this host (None if none)."""
        from sqlalchemy import select

        r = self.t["runs"]
        with self.engine.connect() as c:
            rows = c.execute(select(r).where(r.c.grid == grid_name, r.c.status == "running")).mappings().all()
        for row in rows:
            if row["host"] == socket.gethostname() and _alive(row["pid"]):
                return dict(row)
        return None

    def mark_interrupted(self, grid_name: str) -> None:
        """Runs left `running` by a driver that no longer exists were interrupted (killed, crashed)."""
        from sqlalchemy import select

        r = self.t["runs"]
        with self.engine.begin() as c:
            for row in c.execute(
                select(r.c.id, r.c.host, r.c.pid).where(r.c.grid == grid_name, r.c.status == "running")
            ):
                if row.host != socket.gethostname() or not _alive(row.pid):
                    c.execute(r.update().where(r.c.id == row.id).values(status="interrupted"))

    # --- cells --------------------------------------------------------------------------------------
    def sync_cells(self, grid, eval_keys: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Insert the grid's new cells as pending (one transaction) and return every cell's state:
        {key: {id, status, done_evals: {eval: eval_key}}}."""
        from sqlalchemy import select

        from llamalab.lab.settings import canonical

        tc, ts = self.t["cells"], self.t["settings"]
        with self.engine.begin() as c:
            rows = {
                r.key: r
                for r in c.execute(select(tc.c.id, tc.c.key, tc.c.status).where(tc.c.grid == grid.name))
            }
            for cell in grid.cells:
                if cell.key in rows:
                    c.execute(
                        tc.update()
                        .where(tc.c.id == rows[cell.key].id)
                        .values(ordinal=cell.ordinal, label=cell.label)
                    )
                    continue
                res = c.execute(
                    tc.insert().values(
                        grid=grid.name,
                        key=cell.key,
                        ordinal=cell.ordinal,
                        label=cell.label,
                        settings_json=canonical(cell.settings),
                        status="pending",
                        origin="lab",
                    )
                )
                cid = int(res.inserted_primary_key[0])
                for name, value in sorted(cell.settings.items()):
                    c.execute(ts.insert().values(cell_id=cid, name=name, value_json=_json(value)))
        return self.cell_states(grid.name)

    def cell_states(self, grid_name: str) -> dict[str, dict[str, Any]]:
        from sqlalchemy import select

        tc, tev = self.t["cells"], self.t["evaluations"]
        with self.engine.connect() as c:
            cells = c.execute(select(tc.c.id, tc.c.key, tc.c.status).where(tc.c.grid == grid_name)).all()
            evs = c.execute(
                select(tev.c.cell_id, tev.c.eval, tev.c.eval_key)
                .join(tc, tc.c.id == tev.c.cell_id)
                .where(tc.c.grid == grid_name)
            ).all()
        done: dict[int, dict[str, str]] = {}
        for e in evs:
            done.setdefault(e.cell_id, {})[e.eval] = e.eval_key
        return {r.key: {"id": r.id, "status": r.status, "done_evals": done.get(r.id, {})} for r in cells}

    def record_cell(
        self, cell_id: int, result: dict[str, Any], run_id: int | None, origin: str = "lab"
    ) -> None:
        """Write one finished cell, its evaluations and metrics, in one transaction."""
        tc = self.t["cells"]
        with self.engine.begin() as c:
            env_id = self.environment_id(c, result["environment"]) if result.get("environment") else None
            values = dict(
                status=result["status"],
                error=result.get("error"),
                traceback=result.get("traceback"),
                run_id=run_id,
                environment_id=env_id,
                threads=result.get("threads"),
                started=result.get("started"),
                finished=result.get("finished") or now(),
                seconds=result.get("seconds"),
                artifact_key=result.get("artifact_key"),
                origin=origin,
            )
            c.execute(tc.update().where(tc.c.id == cell_id).values(**values))
            self._write_evals(c, cell_id, result.get("evals") or {})

    def add_evaluation(self, cell_id: int, ev: str, eval_key: str, metrics: dict[str, Any]) -> None:
        """Attach one more evaluation's metrics to a cell, in one transaction (used by importers)."""
        with self.engine.begin() as c:
            self._write_evals(c, cell_id, {ev: {"eval_key": eval_key, "metrics": metrics}})

    def _write_evals(self, c, cell_id: int, evals: dict[str, dict[str, Any]]) -> None:
        from sqlalchemy import delete

        tev, tm = self.t["evaluations"], self.t["metrics"]
        for ev, r in evals.items():
            c.execute(delete(tm).where(tm.c.cell_id == cell_id, tm.c.eval == ev))
            c.execute(delete(tev).where(tev.c.cell_id == cell_id, tev.c.eval == ev))
            c.execute(
                tev.insert().values(
                    cell_id=cell_id,
                    eval=ev,
                    eval_key=r["eval_key"],
                    params_json=_json(r.get("params")),
                    seconds=r.get("seconds"),
                )
            )
            for name, v in sorted(flatten_metrics(r["metrics"]).items()):
                c.execute(
                    tm.insert().values(
                        cell_id=cell_id, eval=ev, name=name, value=_number(v), value_json=_json(v)
                    )
                )

    def set_pending(self, cell_ids: list[int]) -> None:
        tc = self.t["cells"]
        if cell_ids:
            with self.engine.begin() as c:
                c.execute(
                    tc.update()
                    .where(tc.c.id.in_(cell_ids))
                    .values(status="pending", error=None, traceback=None)
                )

    # --- artifacts ----------------------------------------------------------------------------------
    def artifact(self, key: str) -> dict[str, Any] | None:
        from sqlalchemy import select

        ta = self.t["artifacts"]
        with self.engine.connect() as c:
            row = c.execute(select(ta).where(ta.c.key == key)).mappings().first()
        return dict(row) if row else None

    def record_artifact(self, spec, record: dict[str, Any], run_id: int | None, env: dict | None) -> None:
        from sqlalchemy import delete

        from llamalab.lab.settings import canonical

        ta = self.t["artifacts"]
        with self.engine.begin() as c:
            env_id = self.environment_id(c, env) if env else None
            c.execute(delete(ta).where(ta.c.key == spec.key))
            ok = record.get("status", "done") == "done"
            c.execute(
                ta.insert().values(
                    key=spec.key,
                    kind=spec.kind,
                    made_of_json=canonical(spec.made_of),
                    path=str(spec.path),
                    status="done" if ok else "failed",
                    error=record.get("error"),
                    info_json=_json(
                        {k: v for k, v in record.items() if k not in ("error", "traceback", "environment")}
                    ),
                    seconds=record.get("seconds"),
                    bytes=record.get("bytes"),
                    run_id=run_id,
                    environment_id=env_id,
                    created=now(),
                )
            )


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
