"""A run killed with SIGKILL in the middle resumes to the same database as an uninterrupted run (no duplicate
or partial rows), and Ray tasks give the same results as local worker processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

from llamalab.lab.grid import load_grid
from llamalab.lab.runner import run_grid

from .conftest import THREE_CELLS, dump, lab_cli, write_grid


def _finished(db) -> int:
    try:
        con = sqlite3.connect(db, timeout=30)
        n = con.execute("select count(*) from cells where status != 'pending'").fetchone()[0]
        con.close()
        return n
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkill_in_the_middle_then_resume_gives_the_uninterrupted_database(tmp_path, tiny_model_dir):
    reference = load_grid(write_grid(tmp_path / "reference", THREE_CELLS, tiny_model_dir))
    run_grid(reference, workers=0, progress=False)

    killed = write_grid(tmp_path / "killed", THREE_CELLS, tiny_model_dir)
    db = killed.with_suffix(".db")
    proc = subprocess.Popen(
        lab_cli("run", str(killed), "--workers", "1"),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while _finished(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    status = subprocess.run(lab_cli("status", str(killed)), capture_output=True, text=True)
    assert "running: run 1 (pid" in status.stdout and "s left" in status.stdout, status.stdout + status.stderr
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    statuses = [s for (s,) in con.execute("select status from cells")]
    assert 1 <= statuses.count("done") < 3 and "failed" not in statuses, statuses
    # nothing of an unfinished cell was written; the killed run is still marked running
    assert con.execute(
        "select count(*) from metrics m join cells c on c.id = m.cell_id where c.status = 'pending'"
    ).fetchone() == (0,)
    assert con.execute("select status from runs").fetchall() == [("running",)]
    con.close()

    resumed = subprocess.run(lab_cli("run", str(killed), "--workers", "1"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    done_before = statuses.count("done")
    assert f"{3 - done_before} cells done, 0 failed, {done_before} already finished" in resumed.stdout
    assert dump(db) == dump(reference.path.with_suffix(".db"))
    con = sqlite3.connect(db)
    assert [s for (s,) in con.execute("select status from runs order by id")] == ["interrupted", "finished"]
    # each finished cell was run exactly once: cells finished before the kill keep the first run's id
    assert sorted(r for (r,) in con.execute("select run_id from cells")) == [1] * done_before + [2] * (
        3 - done_before
    )


def test_ray_tasks_and_local_workers_give_the_same_results(tmp_path, tiny_model_dir):
    import ray

    on_ray = write_grid(tmp_path / "ray", THREE_CELLS, tiny_model_dir)
    local = write_grid(tmp_path / "local", THREE_CELLS, tiny_model_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray instance for this test
    try:
        address = ray.get_runtime_context().gcs_address
        r = subprocess.run(lab_cli("run", str(on_ray), "--ray", address), capture_output=True, text=True)
    finally:
        ray.shutdown()
    assert r.returncode == 0, r.stderr
    l = subprocess.run(lab_cli("run", str(local), "--workers", "2"), capture_output=True, text=True)
    assert l.returncode == 0, l.stderr
    assert "3 cells done, 0 failed" in r.stdout and "3 cells done, 0 failed" in l.stdout
    assert dump(on_ray.with_suffix(".db")) == dump(local.with_suffix(".db"))
    con = sqlite3.connect(on_ray.with_suffix(".db"))
    assert con.execute("select executor from runs").fetchone()[0] == f"ray:{address}"
