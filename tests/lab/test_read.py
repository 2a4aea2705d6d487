"""Reading results: pivot tables (markdown, CSV), Pareto plots (PNG, SVG), the HTML report with reference
figures, markdown pages from a template, `lab status`, and the MLflow export read back by MLflow."""

from __future__ import annotations

import os
import subprocess

import pytest

from llamalab.errors import LlamalabError
from llamalab.lab.grid import load_grid
from llamalab.lab.plots import pareto_front, point_names
from llamalab.lab.runner import run_grid

from .conftest import TINY_GRID, lab_cli, write_grid

REPORTED = (
    TINY_GRID
    + """
references:
  - {{match: {{label: base}}, source: "Paper et al. (arXiv 0000.00000)", metrics: {{ppl.ppl: 12.5}}}}
report:
  markdown: [{{template: page.md.j2, out: out/page.md}}]
  tables: [{{metric: ppl.ppl, rows: dtype, cols: quant.method}}]
"""
)


@pytest.fixture(scope="module")
def done_grid(tmp_path_factory, tiny_model_dir):
    path = write_grid(tmp_path_factory.mktemp("read"), REPORTED, tiny_model_dir)
    (path.parent / "page.md.j2").write_text(
        "{% for r in rows %}\n{{ r.label }}: {{ r.get('ppl.ppl') | fmt_ppl }}"
        "{% for ref in refs(r) %} (ref {{ ref.metrics['ppl.ppl'] }}){% endfor %}\n\n{% endfor %}\n"
    )
    run_grid(load_grid(path), workers=0, progress=False)
    return path


def cli(*args):
    return subprocess.run(lab_cli(*args), capture_output=True, text=True)


def test_table_markdown_and_csv(done_grid):
    from llamalab.lab.report import fmt_ppl
    from llamalab.lab.results import load_rows
    from llamalab.lab.store import Store

    grid = load_grid(done_grid)
    rows = {r.label: r for r in load_rows(Store(grid.default_db_url()), grid)}
    md = cli("table", str(done_grid), "-m", "ppl.ppl", "-r", "dtype", "-c", "quant.method")
    assert md.returncode == 0, md.stderr
    lines = md.stdout.splitlines()
    assert (
        lines[0] == "| dtype \\ quant.method | rtn | - |" and len(lines) == 5
    )  # fp32, bf16, base (no dtype)
    csv = cli(
        "table", str(done_grid), "-m", "ppl.ppl", "-r", "label", "--format", "csv", "-w", "quant.method=rtn"
    )
    body = dict(line.rsplit(",", 1) for line in csv.stdout.splitlines()[1:])
    assert len(body) == 2 and all(float(v) == rows[k].get("ppl.ppl") for k, v in body.items())
    assert fmt_ppl(1234.5) == "1.2e+03" and fmt_ppl(12.345) == "12.35"


def test_table_errors_are_one_line(done_grid):
    for args, needle in (
        (["-m", "ppl.nope"], "metric 'ppl.nope' is in no cell"),
        (["-m", "ppl.ppl", "-r", "quant.method"], "fall in one slot"),
        (["-m", "ppl.ppl", "--format", "xml"], "--format 'xml'"),
    ):
        r = cli("table", str(done_grid), *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_plot_writes_png_and_svg_with_the_front(done_grid, tmp_path):
    r = cli("plot", str(done_grid), "--out", str(tmp_path / "front"), "--series", "dtype")
    assert r.returncode == 0, r.stderr
    png, svg = tmp_path / "front.png", tmp_path / "front.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()
    assert "Pareto front:" in r.stdout


def test_pareto_front_directions():
    pts = [(4, 20.0, "a"), (8, 16.0, "b"), (4, 25.0, "c"), (3, 50.0, "d"), (8, 17.0, "e")]
    assert [p[2] for p in pareto_front(pts, x_lower=True, y_lower=True)] == ["d", "a", "b"]
    # higher x better (tokens/s), lower y better (ppl)
    assert [p[2] for p in pareto_front(pts, x_lower=False, y_lower=True)] == ["b"]


def test_marked_points_are_named_by_what_tells_them_apart():
    labels = [
        "dtype=bf16 kv=aquakv kv_calib.nsamples=8 bits=4 method=rtn",
        "dtype=bf16 kv=aquakv kv_calib.nsamples=8 bits=4 method=nf4",
        "dtype=bf16 kv=kivi bits=8 method=rtn",
        "fp32 baseline",
    ]
    assert point_names(labels, "kv") == [
        "bits=4 method=rtn",
        "bits=4 method=nf4",
        "bits=8 method=rtn",
        "fp32 baseline",
    ]
    assert point_names(["dtype=bf16 kv=dense"], "kv") == ["dtype=bf16"] and point_names(["kv=a"], "kv") == [
        "kv=a"
    ]


def test_html_report_and_markdown_pages(done_grid):
    r = cli("report", str(done_grid))
    assert r.returncode == 0, r.stderr
    page = done_grid.with_suffix(".html").read_text()
    for needle in (
        "<svg",
        "Reference figures",
        "Paper et al.",
        "ppl.ppl by dtype x quant.method",
        "name: tiny",
        "torch",
    ):
        assert needle in page, needle
    assert "<img" not in page and "src=" not in page  # self-contained
    umask = os.umask(0)
    os.umask(umask)
    assert done_grid.with_suffix(".html").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    r = cli("report", str(done_grid), "--markdown")
    assert r.returncode == 0, r.stderr
    text = (done_grid.parent / "out" / "page.md").read_text()
    assert text.splitlines()[-1].startswith("base: ") and text.splitlines()[-1].endswith("(ref 12.5)")


def test_status_lists_counts(done_grid):
    r = cli("status", str(done_grid), "--watch")  # nothing running: returns at once
    assert r.returncode == 0, r.stderr
    assert "3 cells, 3 done, 0 failed, 0 pending" in r.stdout


def test_mlflow_export_reads_back_and_skips_what_is_there(done_grid, tmp_path):
    from mlflow.tracking import MlflowClient

    target = tmp_path / "mlruns"
    first = cli("export", str(done_grid), "--mlflow", str(target))
    assert first.returncode == 0 and "exported 3 cells" in first.stdout, first.stderr
    again = cli("export", str(done_grid), "--mlflow", str(target))
    assert "exported 0 cells" in again.stdout and "3 were there" in again.stdout
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=target.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    base = next(r for r in runs if r.info.run_name == "base")
    assert (
        base.data.metrics["ppl.ppl"] > 1
        and base.data.metrics["ppl:long.ppl"] > 1  # `ppl@long` under a name MLflow accepts
        and base.data.params["threads"] == "1"
        and base.info.status == "FINISHED"
    )
    assert {r.data.tags["llamalab.grid"] for r in runs} == {"tiny"}


def test_newer_schema_is_refused_before_any_work(tiny_grid, tmp_path):
    import sqlite3

    from llamalab.lab.store import SCHEMA_VERSION, Store

    grid = load_grid(tiny_grid)
    Store(grid.default_db_url()).create()
    db = tiny_grid.with_suffix(".db")
    con = sqlite3.connect(db)
    con.execute("update schema_info set value = ? where key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    for args in (
        ["run", str(tiny_grid)],
        ["status", str(tiny_grid)],
        ["table", str(tiny_grid), "-m", "ppl.ppl"],
    ):
        r = cli(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "written by a newer llamalab (lab schema" in r.stderr
    assert con.execute("select count(*) from cells").fetchone() == (0,)
    assert not grid.artifact_root().exists()
    with pytest.raises(LlamalabError, match="newer llamalab"):
        run_grid(grid, workers=0)


def test_cli_bad_grids_fail_in_one_line_and_create_nothing(tmp_path, tiny_model_dir):
    cases = {
        "method": "include: [{{quant.method: zzq}}]",
        "option": "include: [{{flux: 1}}]",
    }
    for name, body in cases.items():
        path = write_grid(
            tmp_path / name,
            f"name: b\noptions: {{{{model: {{model}}}}}}\n{body}\nevals: {{{{ppl: {{{{}}}}}}}}\n",
            tiny_model_dir,
        )
        r = cli("run", str(path))
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert not path.with_suffix(".db").exists()
    path = write_grid(tmp_path / "eval", "name: b\nevals: {{bleu: {{}}}}\n", tiny_model_dir)
    r = cli("run", str(path))
    assert r.returncode == 1 and "unknown evaluation 'bleu'" in r.stderr
    r = cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "no such grid file" in r.stderr
