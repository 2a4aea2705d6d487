"""A grid crossing weight quantization with AQUA-KV: the predictors are an artifact fitted once per weights and
calibration on the (quantized) model the cell runs, they equal `llamalab kv calibrate` on that model, and
the cells that read them give the numbers of a direct evaluation with that file."""

from __future__ import annotations

import json
import sqlite3

import pytest

from llamalab.errors import LlamalabError
from llamalab.lab.grid import load_grid
from llamalab.lab.results import load_rows
from llamalab.lab.runner import run_grid
from llamalab.lab.store import Store

from .conftest import write_grid

KV_GRID = """
name: kv
options:
  model: {model}
  threads: 1
  quant.bits: 4
  quant.group_size: 32
  kv_calib: {{nsamples: 4, seq_len: 48}}
sweep:
  - {{quant.method: [none, rtn], kv: dense}}
  - {{quant.method: [none, rtn], kv: kivi, kv_bits: 2, kv_group_size: 16}}
  - {{quant.method: [none, rtn], kv: aquakv, kv_bits: 2, kv_args.buffer: 16, dtype: [fp32, bf16]}}
evals:
  ppl: {{data: alice_heldout, seq_len: 96, max_windows: 1, chunk_size: 16}}
"""


def test_kv_predictors_are_built_once_per_weights_on_the_cells_model(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from llamalab.eval.perplexity import perplexity
    from llamalab.kv.calibration import KVCalibration, fit_kv_parameters
    from llamalab.model_options import ModelOptions, load_model
    from llamalab.quant.calib import alice_split

    grid = load_grid(write_grid(tmp_path, KV_GRID, tiny_model_dir))
    # kv_calib.* only where a KV method fits something: dense and kivi cells do not carry it
    assert all(("kv_calib.nsamples" in c.settings) == (c.settings["kv"] == "aquakv") for c in grid.cells)
    summary = run_grid(grid, workers=0, progress=False)
    assert (summary.done, summary.failed) == (8, 0), summary.errors
    # one quantized model, and predictors for the base weights and for the quantized ones; both dtypes of a
    # weight share them (the fit runs in fp32)
    assert summary.artifacts_built == 3
    con = sqlite3.connect(grid.default_db_url().removeprefix("sqlite:///"))
    kinds = dict(con.execute("select kind, count(*) from artifacts group by kind").fetchall())
    assert kinds == {"quantized": 1, "kv_predictors": 2}
    rows = load_rows(Store(grid.default_db_url()), grid)

    def row(kv: str, dtype: str = "fp32"):
        (found,) = [
            r
            for r in rows
            if r.get("quant.method") == "rtn" and r.get("kv") == kv and r.get("dtype", "fp32") == dtype
        ]
        return found

    quantized_key = row("dense").artifact_key
    aqua = row("aquakv")
    assert aqua.artifact_key == row("aquakv", "bf16").artifact_key != quantized_key
    assert aqua.get("model.bits_per_weight") == pytest.approx(4.625)  # still the quantized model's
    # what the fit cost and how well its predictors did on held-out windows travel with every cell using it
    assert aqua.get("model.kv_calibrate_seconds") >= 0
    assert isinstance(aqua.get("model.kv_predictor_bits.key"), float)
    folder = grid.artifact_root() / f"kv_predictors-{aqua.artifact_key}"
    record = json.loads((folder / "lab-artifact.json").read_text())
    assert record["made_of"]["model"] == {"quantized": quantized_key}

    # the artifact is what `kv calibrate` fits on the quantized model with the same settings
    torch.set_num_threads(1)
    quantized_dir = grid.artifact_root() / f"quantized-{quantized_key}"
    direct = fit_kv_parameters(
        load_model(ModelOptions(model=str(quantized_dir))),
        KVCalibration(bits=2, nsamples=4, seq_len=48),
        progress=False,
    )
    direct.save(tmp_path / "direct.safetensors")
    stored, fresh = load_file(folder / "predictors.safetensors"), load_file(tmp_path / "direct.safetensors")
    assert stored.keys() == fresh.keys() and all(torch.equal(stored[k], fresh[k]) for k in stored)
    # and the cell's perplexity is a direct evaluation's with that file
    opts = ModelOptions(
        model=str(quantized_dir),
        kv="aquakv",
        kv_bits=2,
        kv_args={"buffer": "16"},
        kv_predictors=str(folder / "predictors.safetensors"),
    )
    llm = load_model(opts)
    ids = llm.encode(alice_split()[1], add_special_tokens=False)
    direct_ppl = perplexity(llm, ids, 96, chunk_size=16, max_windows=1, opts=opts, progress=False).ppl
    assert aqua.get("ppl.ppl") == direct_ppl
    # predictors read the compressed cache: 2-bit AQUA-KV is not the dense figure
    assert aqua.get("ppl.ppl") != row("dense").get("ppl.ppl")

    # again: nothing is built or run
    again = run_grid(grid, workers=0, progress=False)
    assert (again.skipped, again.artifacts_built) == (8, 0)


BAD = """
name: bad
options: {{model: {model}, threads: 1, kv: aquakv}}
include:
  - {{label: odd-bits, kv_bits: 7}}
  - {{label: ok-file, kv_predictors: missing.safetensors}}
evals:
  ppl: {{data: alice_heldout, seq_len: 64, max_windows: 1}}
"""


def test_kv_calibration_settings_are_checked_before_any_work(tmp_path, tiny_model_dir):
    path = write_grid(tmp_path, BAD, tiny_model_dir)
    grid = load_grid(path)
    errors = {c.label: c.error for c in grid.cells}
    assert "bits" in errors["odd-bits"] and errors["ok-file"] is None  # a named file needs no calibration
    path.write_text(path.read_text().replace("kv: aquakv}", "kv: aquakv, kv_calib.bogus: 1}"))
    with pytest.raises(LlamalabError, match=r"unknown option 'kv_calib.bogus'.*kv_calib.nsamples"):
        load_grid(path)
