"""The same grid into PostgreSQL and into SQLite gives the same database: the `--db URL` path a team's
shared server takes, against a real PostgreSQL server started by the test (`pgserver` carries its
binaries; the test is skipped where no wheel of it exists for this Python)."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import THREE_CELLS, dump, lab_cli, write_grid


@pytest.fixture
def postgres_url(tmp_path):
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    # pgserver's URI names the libpq driver; SQLAlchemy reaches it through psycopg 3
    yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


def test_a_grid_into_postgresql_equals_the_same_grid_into_sqlite(tmp_path, tiny_model_dir, postgres_url):
    on_pg = write_grid(tmp_path / "pg", THREE_CELLS, tiny_model_dir)
    on_sqlite = write_grid(tmp_path / "sqlite", THREE_CELLS, tiny_model_dir)
    r = subprocess.run(
        lab_cli("run", str(on_pg), "--workers", "0", "--db", postgres_url), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    s = subprocess.run(lab_cli("run", str(on_sqlite), "--workers", "0"), capture_output=True, text=True)
    assert s.returncode == 0, s.stderr
    assert "3 cells done, 0 failed" in r.stdout and "3 cells done, 0 failed" in s.stdout
    assert dump(postgres_url) == dump(on_sqlite.with_suffix(".db"))
    assert not on_pg.with_suffix(".db").exists()  # nothing went to the default SQLite file
    # a second run resumes from the server's rows; the readers take the same URL
    again = subprocess.run(
        lab_cli("run", str(on_pg), "--workers", "0", "--db", postgres_url), capture_output=True, text=True
    )
    assert again.returncode == 0 and "3 already finished" in again.stdout, again.stdout + again.stderr
    table = subprocess.run(
        lab_cli("table", str(on_pg), "--db", postgres_url, "--metric", "ppl.ppl"),
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0 and table.stdout.count("|") > 6, table.stdout + table.stderr
