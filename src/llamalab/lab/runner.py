"""The driver of `llamalab lab run`: decide what is left, build artifacts before the cells that need them,
run cells on an executor, and record each finished one (the driver is the database's only writer).

Resuming is the default: a cell whose status is `done` and whose evaluations all carry the grid's current
parameter keys is never run again; a `failed` cell is retried only with `retry_failed`; a cell that was
running when a run was killed is still `pending` (nothing of it was written) and runs again. Artifacts
found finished (in the database, or on disk with their marker after a kill between build and record) are
reused. A cell's artifacts form a chain (a trained model, a quantization of it, KV predictors fitted on
that): each is built once its predecessor is there, and a cell runs when its whole chain is.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.io.registry import DEFAULT_MODEL
from llamalab.lab.artifacts import ArtifactSpec, cell_artifacts, cell_inputs, clean_staging, read_marker
from llamalab.lab.grid import Cell, Grid, _matches
from llamalab.lab.store import Store
from llamalab.lab.worker import build_artifact, environment, run_cell


@dataclass
class RunSummary:
    run_id: int | None
    db: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    artifacts_built: int = 0
    artifacts_reused: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Pending:
    cell: Cell
    cell_id: int
    evals: list[dict[str, Any]]
    artifacts: list[ArtifactSpec] = field(default_factory=list)  # in build order
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> finished build record


def parse_where(items: list[str] | None) -> dict[str, Any]:
    """['quant.method=rtn', 'quant.bits=[4,8]'] -> {'quant.method': 'rtn', 'quant.bits': [4, 8]}."""
    import yaml

    from llamalab.lab.settings import check_key

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LlamalabError(f"--where {item!r} is not KEY=VALUE")
        if key.strip() != "label":
            check_key(key.strip(), "--where")
        out[key.strip()] = yaml.safe_load(value)
    return out


def select(grid: Grid, where: dict[str, Any]) -> list[Cell]:
    label = where.get("label")
    rest = {k: v for k, v in where.items() if k != "label"}
    labels = label if isinstance(label, list) else [label]
    return [c for c in grid.cells if _matches(c.settings, rest) and (label is None or c.label in labels)]


def default_threads(grid: Grid, workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def plan(
    grid: Grid, store: Store, where: dict[str, Any], retry_failed: bool
) -> tuple[list[Pending], list, int]:
    """(cells to run, cells rejected by their method, cells already finished)."""
    states = store.sync_cells(grid, {e.name: e.key for e in grid.evals})
    todo, rejected, skipped = [], [], 0
    root = grid.artifact_root()
    for cell in select(grid, where):
        state = states[cell.key]
        if cell.error:
            if state["status"] != "failed":
                rejected.append((cell, state["id"]))
            else:
                skipped += 1
            continue
        if state["status"] == "failed" and not retry_failed:
            skipped += 1
            continue
        missing = [e for e in grid.evals if state["done_evals"].get(e.name) != e.key]
        if state["status"] == "done" and not missing:
            skipped += 1
            continue
        if state["status"] == "failed":
            missing = list(grid.evals)
        model = grid.model_path(str(cell.settings.get("model", DEFAULT_MODEL)))
        artifacts = cell_artifacts(cell.settings, model, root, grid.base)
        evals = [{"name": e.name, "key": e.key, "params": e.params} for e in missing]
        todo.append(Pending(cell, state["id"], evals, artifacts))
    return todo, rejected, skipped


def run_grid(
    grid: Grid,
    db_url: str | None = None,
    workers: int = 1,
    ray: str | None = None,
    threads: int | None = None,
    where: dict[str, Any] | None = None,
    retry_failed: bool = False,
    progress: bool | None = None,
    command: str = "",
) -> RunSummary:
    """Run every cell of `grid` that is not finished yet (see the module docstring)."""
    from tqdm import tqdm

    store = Store(db_url or grid.default_db_url())
    store.create()
    live = store.live_run(grid.name)
    if live:
        raise LlamalabError(
            f"grid {grid.name!r} is being run by pid {live['pid']} "
            f"(run {live['id']}, since {live['started']}); "
            "watch it with `llamalab lab status`"
        )
    store.mark_interrupted(grid.name)
    todo, rejected, skipped = plan(grid, store, where or {}, retry_failed)
    summary = RunSummary(None, store.url, skipped=skipped)
    executor_name = f"ray:{ray}" if ray else ("inline" if workers == 0 else "local")
    run_id = store.start_run(grid, command, executor_name, workers, environment())
    summary.run_id = run_id
    for cell, cell_id in rejected:  # a method refused the settings: recorded without any work
        store.record_cell(cell_id, {"status": "failed", "error": cell.error}, run_id)
        summary.failed += 1
        summary.errors.append(f"{cell.label}: {cell.error}")
    if not todo:
        store.finish_run(run_id, "finished")
        return summary
    n_threads = threads or default_threads(grid, workers)
    root = grid.artifact_root()
    root.mkdir(parents=True, exist_ok=True)
    clean_staging(root)
    from llamalab.lab.executors import make_executor

    executor = make_executor(workers, ray)
    bar = tqdm(
        total=len(todo),
        unit="cell",
        desc=f"lab {grid.name}",
        disable=None if progress is None else not progress,
    )
    futures: dict[cf.Future, tuple[str, Any]] = {}
    known: dict[str, dict | None] = {}  # artifact key -> finished build record (None: not built)
    waiting: dict[str, tuple[ArtifactSpec, list[Pending]]] = {}  # artifact being built -> cells parked on it
    failed_builds: dict[str, dict[str, Any]] = {}
    status = "failed"

    def chain_ready(p: Pending) -> bool:
        """Take the cell's finished artifacts in order; False at the first one still to build."""
        while len(p.records) < len(p.artifacts):
            spec = p.artifacts[len(p.records)]
            if spec.key not in known:
                known[spec.key] = _finished_artifact(spec, store, run_id)
                summary.artifacts_reused += known[spec.key] is not None
            if known[spec.key] is None:
                return False
            p.records[spec.kind] = known[spec.key]
        return True

    def submit_cell(p: Pending) -> None:
        model = grid.model_path(str(p.cell.settings.get("model", DEFAULT_MODEL)))
        weights, predictors = cell_inputs(p.artifacts, model)
        task = {
            "settings": p.cell.settings,
            "evals": p.evals,
            "threads": p.cell.settings.get("threads") or n_threads,
            "model_path": weights,
            "kv_predictors": predictors,
            "artifacts": p.records,
        }
        futures[executor.submit(run_cell, task, task["threads"])] = ("cell", p)

    def park(p: Pending) -> None:
        """Wait for the next artifact of the cell's chain, starting its build if nobody has."""
        spec = p.artifacts[len(p.records)]
        if spec.key in failed_builds:
            record(p, dict(failed_builds[spec.key]))
        elif spec.key in waiting:
            waiting[spec.key][1].append(p)
        else:
            waiting[spec.key] = (spec, [p])
            # built with the threads its cells run with (a grid that pins threads pins them for GPTQ too)
            build_threads = p.cell.settings.get("threads") or n_threads
            futures[executor.submit(build_artifact, spec.task(build_threads), build_threads)] = (
                "artifact",
                spec.key,
            )

    def record(p: Pending, result: dict[str, Any]) -> None:
        result["artifact_key"] = p.artifacts[-1].key if p.artifacts else None  # the chain's last
        store.record_cell(p.cell_id, result, run_id)
        if result["status"] == "done":
            summary.done += 1
        else:
            summary.failed += 1
            summary.errors.append(f"{p.cell.label}: {result.get('error')}")
        bar.update(1)
        if progress is None and bar.disable:  # no terminal (a log, CI): a line per finished cell, not a bar
            end = "done" if result["status"] == "done" else f"failed: {result.get('error')}"
            print(
                f"[{summary.done + summary.failed}/{len(todo)}] {p.cell.label}: {end} "
                f"({result.get('seconds') or 0:.0f} s)",
                flush=True,
            )
        bar.set_postfix(done=summary.done, failed=summary.failed, building=len(waiting))

    try:
        built = [chain_ready(p) for p in todo]
        for p in itertools.compress(todo, built):  # cells with everything built go first, then the builds
            submit_cell(p)
        for p, ready in zip(todo, built):
            if not ready:
                park(p)
        bar.set_postfix(done=0, failed=0, building=len(waiting))
        while futures:
            finished, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                kind, payload = futures.pop(fut)
                result = _result(fut)
                if kind == "cell":
                    record(payload, result)
                    continue
                spec, cells = waiting.pop(payload)
                store.record_artifact(spec, result, run_id, result.get("environment"))
                if result["status"] == "done":
                    summary.artifacts_built += 1
                    known[spec.key] = result
                    for p in cells:
                        if chain_ready(p):
                            submit_cell(p)
                        else:
                            park(p)
                else:  # every cell that needed it fails with the build's error
                    what = spec.made_of.get("method", spec.kind)
                    failed_builds[spec.key] = {
                        "status": "failed",
                        "error": f"artifact {spec.key} ({what}): {result['error']}",
                        "traceback": result.get("traceback"),
                    }
                    for p in cells:
                        record(p, dict(failed_builds[spec.key]))
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        bar.close()
        executor.shutdown()
        store.finish_run(run_id, status)
    return summary


def _result(fut: cf.Future) -> dict[str, Any]:
    """A task's result dict; a worker that died (killed, out of memory) becomes a failure record."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return fut.result()
    except BrokenProcessPool:
        raise LlamalabError(
            "a worker process died (killed, or out of memory); finished cells are recorded, the others stay "
            "pending: run the grid again to resume"
        ) from None
    except Exception as e:  # Ray's WorkerCrashedError and the like: this task failed, the grid goes on
        return {"status": "failed", "error": f"worker lost: {type(e).__name__}: {e}"}


def _finished_artifact(spec: ArtifactSpec, store: Store, run_id: int) -> dict | None:
    import json

    row = store.artifact(spec.key)
    marker = read_marker(spec.path)
    if row and row["status"] == "done" and marker is not None:
        return json.loads(row["info_json"])
    if marker is not None:  # built, but the run was killed before recording it
        store.record_artifact(spec, {"status": "done", **marker}, run_id, None)
        return marker
    return None
