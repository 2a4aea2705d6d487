"""What runs in a worker (a local process or a Ray task): build one artifact, or run one cell's evaluations.

Tasks and results are plain dicts, so the same functions run under concurrent.futures and Ray. They never
raise (except on Ctrl-C, which leaves the cell pending): an error becomes
`{"status": "failed", "error": one line, "traceback": ...}` for the driver to record, so one bad cell never
stops the grid. A user error (`LlamalabError`: a group size that does not divide a layer, a length beyond
the context) is its message alone; anything else keeps its type and the traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from llamalab.errors import LlamalabError


def environment(device: str = "cpu") -> dict[str, Any]:
    """This machine and the versions of the libraries that can change a number."""
    from llamalab.eval.report import machine, versions

    m = machine(device)
    m.pop("torch_threads", None)  # per cell (cells.threads), not per machine
    return {"host": socket.gethostname(), "machine": m, "versions": versions()}


def _failure(e: BaseException) -> dict[str, Any]:
    if isinstance(e, LlamalabError):
        return {"status": "failed", "error": str(e), "traceback": None}
    return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _threads(n: int | None) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def build_artifact(task: dict[str, Any]) -> dict[str, Any]:
    """Build one artifact (see artifacts.py); returns its build record with `status`."""
    from llamalab.lab.artifacts import BUILDERS

    t0 = time.perf_counter()
    try:
        _threads(task.get("threads"))
        if task["kind"] not in BUILDERS:
            raise LlamalabError(f"unknown artifact kind {task['kind']!r}")
        record = {"status": "done", **BUILDERS[task["kind"]](task)}
    except Exception as e:  # reported, not raised: one bad cell must not stop the grid
        record = _failure(e)
        record["seconds"] = time.perf_counter() - t0
    record["environment"] = environment()
    return record


def run_cell(task: dict[str, Any]) -> dict[str, Any]:
    """Load the cell's model (its artifact if it has one) and run the evaluations it still lacks."""
    from llamalab.lab.evals import MODEL, get_evaluation, model_metrics
    from llamalab.lab.settings import model_options
    from llamalab.model_options import load_model

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"started": started, "pid": os.getpid()}
    try:
        opts = model_options(
            task["settings"], task.get("model_path"), task.get("threads"), task.get("kv_predictors")
        )
        out["threads"] = _threads(opts.threads)
        load_t0 = time.perf_counter()
        llm = load_model(opts)
        metrics = model_metrics(llm, task.get("artifacts") or {})
        metrics["load_seconds"] = time.perf_counter() - load_t0
        evals = {
            MODEL: {"eval_key": MODEL, "params": {}, "metrics": metrics, "seconds": metrics["load_seconds"]}
        }
        for ev in task["evals"]:
            e0 = time.perf_counter()
            m = get_evaluation(ev["name"], "grid").run(llm, opts, ev["params"])
            evals[ev["name"]] = {
                "eval_key": ev["key"],
                "params": ev["params"],
                "metrics": m,
                "seconds": time.perf_counter() - e0,
            }
        out.update(status="done", evals=evals)
    except Exception as e:  # see build_artifact (Ctrl-C is not caught: the cell stays pending)
        out.update(_failure(e))
    out["seconds"] = time.perf_counter() - t0
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out["environment"] = environment(task["settings"].get("device", "cpu"))
    return out
