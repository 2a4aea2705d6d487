"""Reports: JSON with settings, versions and machine; a markdown results table; PNG plots."""

from __future__ import annotations

import json

from llamalab.eval.report import append_markdown, markdown_row, plot_curve, plot_heatmap, versions, write_json
from llamalab.model_options import ModelOptions


def _report(**metrics):
    return {
        "eval": "ppl",
        "created": "2026-01-02T03:04:05+00:00",
        "model": {"name": "smollm2-135m"},
        "model_options": ModelOptions(kv="dense", rope_scaling="linear", rope_factor=2.0).to_dict(),
        "settings": {"data": "alice.txt", "seq_len": 256, "stride": None},
        "metrics": metrics,
    }


def test_markdown_table_gets_one_header_and_a_row_per_run(tmp_path):
    path = tmp_path / "results.md"
    append_markdown(path, _report(ppl=12.3456789, tokens=1020), ["ppl"])
    append_markdown(path, _report(ppl=10.0, tokens=5), ["ppl"])
    lines = path.read_text().splitlines()
    assert lines[0] == "| date | eval | model | settings | metrics |" and len(lines) == 4
    assert lines[2] == (
        "| 2026-01-02 | ppl | smollm2-135m | rope_scaling=linear; rope_factor=2; data=alice.txt; seq_len=256 "
        "| ppl=12.35 |"
    )
    assert markdown_row(_report(a="x|y")).endswith("| a=x\\|y |\n")  # a pipe cannot break the table
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, nothing left behind


def test_json_and_versions(tmp_path):
    write_json({**_report(ppl=1.5), "versions": versions()}, tmp_path / "r" / "report.json")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["metrics"] == {"ppl": 1.5}
    assert data["versions"]["torch"] and data["versions"]["llamalab"]


def test_plots_are_pngs(tmp_path):
    plot_curve([1024, 2048, 4096], {"m": [1.0, 0.9, 0.5]}, tmp_path / "curve.png", "t", "x", "y")
    plot_heatmap([[1.0, 0.5], [0.0, 1.0]], ["0%", "100%"], ["1K", "2K"], tmp_path / "heat.png", "t", "x", "y")
    for name in ("curve.png", "heat.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
