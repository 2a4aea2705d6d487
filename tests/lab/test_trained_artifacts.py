"""A grid that trains before it quantizes: the training run is an artifact built once from the cell's recipe,
equal to `llamalab train` with the same config, and the cells that quantize or evaluate start from it."""

from __future__ import annotations

import json
import sqlite3
import textwrap

import pytest

from llamalab.errors import LlamalabError
from llamalab.lab.grid import load_grid
from llamalab.lab.results import load_rows
from llamalab.lab.runner import run_grid
from llamalab.lab.store import Store

from .conftest import write_grid

RECIPE = """
objective: clm
data: {train: [{source: alice}], eval: null, seq_len: 64}
lora: {r: 4, alpha: 8, targets: [q_proj, v_proj]}
batch: {micro: 2}
steps: 3
optim: {lr: 1.0e-2}
"""

TRAINED_GRID = """
name: trained
options: {{model: {model}, threads: 1, quant.bits: 4, quant.group_size: 32}}
sweep:
  train.recipe: [none, recipe.yaml]
  quant.method: [none, rtn]
evals:
  ppl: {{data: alice_heldout, seq_len: 64, max_windows: 2}}
"""


def test_a_trained_model_is_built_once_and_quantized_from(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    import llamalab
    from llamalab.eval.perplexity import perplexity
    from llamalab.quant.calib import alice_split
    from llamalab.train.config import load_config
    from llamalab.train.loop import train

    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(RECIPE))
    grid = load_grid(write_grid(tmp_path, TRAINED_GRID, tiny_model_dir))
    # `train.recipe: none` is no training: those cells are the plain ones
    assert sum("train.recipe" in c.settings for c in grid.cells) == 2
    summary = run_grid(grid, workers=0, progress=False)
    assert (summary.done, summary.failed, summary.artifacts_built) == (4, 0, 3), summary.errors
    con = sqlite3.connect(grid.default_db_url().removeprefix("sqlite:///"))
    made = {k: json.loads(m) for k, m in con.execute("select key, made_of_json from artifacts")}
    (trained_key,) = [k for k, m in made.items() if m["kind"] == "trained"]
    quantized_from = sorted(str(m["model"]) for m in made.values() if m["kind"] == "quantized")
    assert len(quantized_from) == 2 and str({"trained": trained_key}) in quantized_from

    rows = load_rows(Store(grid.default_db_url()), grid)

    def row(trained: bool, method: str):
        (found,) = [
            r
            for r in rows
            if ("train.recipe" in r.settings) == trained and r.get("quant.method", "none") == method
        ]
        return found

    trained_plain = row(True, "none")
    assert trained_plain.artifact_key == trained_key and trained_plain.get("model.train_final_loss") > 0
    assert row(True, "rtn").artifact_key not in (trained_key, row(False, "rtn").artifact_key)

    # the artifact's model is what `llamalab train` makes of the same config on the same model
    torch.set_num_threads(1)
    cfg = load_config(tmp_path / "recipe.yaml", [f"model={tiny_model_dir}", f"out={tmp_path / 'direct'}"])
    cfg.threads = 1
    direct = train(cfg).export
    folder = grid.artifact_root() / f"trained-{trained_key}"
    ours, theirs = load_file(folder / "model" / "model.safetensors"), load_file(direct / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (folder / "checkpoints").exists() and (folder / "adapter").is_dir()
    # the trained cell's perplexity is a direct evaluation of that model, and training changed it
    llm = llamalab.load(str(direct))
    ids = llm.encode(alice_split()[1], add_special_tokens=False)
    assert trained_plain.get("ppl.ppl") == perplexity(llm, ids, 64, max_windows=2, progress=False).ppl
    assert trained_plain.get("ppl.ppl") != row(False, "none").get("ppl.ppl")


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("train.recipe: missing.yaml", "missing.yaml: no such config file"),
        ("train.recipe: recipe.yaml, train.bogus: 1", "unknown setting(s) bogus"),
        ("train.steps: 5", "train.steps: train.* settings need a train.recipe"),
    ],
)
def test_training_settings_are_checked_before_any_work(tmp_path, tiny_model_dir, extra, needle):
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(RECIPE))
    text = f"name: t\noptions: {{{{model: {{model}}, {extra}}}}}\nevals: {{{{ppl: {{{{seq_len: 64}}}}}}}}\n"
    with pytest.raises(LlamalabError, match="cell") as e:
        load_grid(write_grid(tmp_path, text, tiny_model_dir))
    assert needle in str(e.value)


def test_a_value_the_training_config_rejects_is_that_cells_error(tmp_path, tiny_model_dir):
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(RECIPE))
    text = "name: t\noptions: {{model: {model}, train.recipe: recipe.yaml}}\nsweep: {{train.steps: [0, 2]}}\n"
    grid = load_grid(write_grid(tmp_path, text + "evals: {{ppl: {{seq_len: 64}}}}\n", tiny_model_dir))
    errors = {c.settings["train.steps"]: c.error for c in grid.cells}
    assert "steps must be at least 1" in errors[0] and errors[2] is None
