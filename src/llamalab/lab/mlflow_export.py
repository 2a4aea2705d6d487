"""`llamalab lab export`: every finished or failed cell as one MLflow run, through MLflow's own client.

The target is any MLflow tracking URI: a server (`http://mlflow.example:5000`, the usual case for a team)
or a local directory, which MLflow writes in its file-store format (MLflow 3 keeps that store in
maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`; we set it for a directory target, since asking for a
directory is asking for that format). The experiment is the grid's name unless `--experiment` says
otherwise. Each run carries the cell's settings as params, every numeric metric (`ppl.ppl`,
`model.bits_per_weight`, ...; a labelled evaluation's `ppl@docs.ppl` as `ppl:docs.ppl`, since MLflow
refuses "@" in names) as metrics, and tags `llamalab.grid`, `llamalab.cell_key`, `llamalab.origin`,
`llamalab.status`; a cell already exported (same grid and key in that experiment) is skipped, so exporting
again only adds new cells.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.lab.results import load_rows

PARAM_LIMIT = 6000  # MLflow's longest param value


def tracking_uri(target: str) -> str:
    if "://" in target and not target.startswith("file://"):
        return target
    path = Path(target.removeprefix("file://")).expanduser().resolve()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return path.as_uri()


def export(grid, store, target: str, experiment: str | None = None) -> tuple[int, int]:
    """(runs created, cells skipped because already exported)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise LlamalabError(
            "export needs MLflow's client: pip install 'llamalab[lab]' (mlflow-skinny)"
        ) from None
    client = MlflowClient(tracking_uri=tracking_uri(target))
    name = experiment or grid.name
    try:
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        existing = client.search_runs(
            [exp_id], filter_string=f"tags.`llamalab.grid` = '{grid.name}'", max_results=50000
        )
    except Exception as e:  # an unreachable server, a refused login: one line, not MLflow's traceback
        raise LlamalabError(
            f"MLflow at {target}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    done_keys = {r.data.tags.get("llamalab.cell_key") for r in existing}
    try:
        return _export_rows(client, exp_id, grid, load_rows(store, grid), done_keys)
    except Exception as e:  # a server that refuses a value: one line naming it
        raise LlamalabError(
            f"MLflow at {target}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None


def _export_rows(client, exp_id: str, grid, rows, done_keys: set) -> tuple[int, int]:
    from mlflow.entities import Metric, Param

    created = skipped = 0
    for row in rows:
        if row.status == "pending" or row.key in done_keys:
            skipped += row.key in done_keys
            continue
        run = client.create_run(
            exp_id,
            run_name=row.label[:250] or row.key,
            tags={
                "llamalab.grid": grid.name,
                "llamalab.cell_key": row.key,
                "llamalab.origin": row.origin or "lab",
                "llamalab.status": row.status,
                **({"llamalab.error": row.error[:5000]} if row.error else {}),
            },
        )
        params = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in sorted(row.settings.items())]
        if (
            row.threads and "threads" not in row.settings
        ):  # the threads it ran with, when the grid left them free
            params.append(Param("threads", str(row.threads)))
        metrics = [
            Metric(
                k.replace("@", ":"), float(v), 0, 0
            )  # MLflow refuses "@" in names: ppl@docs.ppl -> ppl:docs.ppl
            for k, v in sorted(row.metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, max(len(metrics), len(params), 1), 100):  # MLflow's batch limits
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
        client.set_terminated(run.info.run_id, "FINISHED" if row.status == "done" else "FAILED")
        created += 1
    return created, skipped
