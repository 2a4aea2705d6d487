"""Grid files: expansion (sweeps, unions, include/exclude, duplicates), stable keys, and one-line errors for
every unknown name before any work."""

from __future__ import annotations

import pytest

from llamalab.errors import LlamalabError
from llamalab.lab.grid import load_grid

from .conftest import write_grid

BASE = """
name: g
options: {{model: {model}}}
{body}
evals:
  ppl: {{seq_len: 64, max_windows: 1}}
"""


def grid_with(tmp_path, body: str, model="smollm2-135m"):
    text = BASE.replace("{body}", body.replace("{", "{{").replace("}", "}}"))
    return load_grid(write_grid(tmp_path, text, model))


def test_sweep_blocks_cross_and_unite_include_adds_exclude_drops(tmp_path):
    grid = grid_with(
        tmp_path,
        """
sweep:
  - {quant.method: [rtn, gptq], quant.bits: [4, 3], quant.group_size: 64}
  - {quant.method: nf4}
include:
  - {label: baseline, quant.method: none}
exclude:
  - {quant.method: gptq, quant.bits: 3}
""",
    )
    settings = [c.settings for c in grid.cells]
    combos = [(s.get("quant.method"), s.get("quant.bits")) for s in settings]
    assert combos == [("rtn", 4), ("rtn", 3), ("gptq", 4), ("nf4", None), (None, None)]
    assert grid.cells[-1].label == "baseline" and grid.cells[-1].settings == {"model": "smollm2-135m"}
    assert [c.ordinal for c in grid.cells] == list(range(5))
    assert len({c.key for c in grid.cells}) == 5


def test_without_a_method_other_quant_keys_collapse_and_4_equals_4_0(tmp_path):
    grid = grid_with(
        tmp_path,
        "sweep: {quant.method: [none], quant.bits: [4, 8]}\ninclude: [{quant.method: rtn, quant.bits: 4.0}]",
    )
    assert len(grid.cells) == 2  # none x {4, 8} is one cell
    again = grid_with(tmp_path / "b", "include: [{quant: {method: rtn, bits: 4}}]")  # nesting = dotted keys
    assert grid.cells[1].key == again.cells[0].key


def test_keys_do_not_depend_on_where_the_grid_lives(tmp_path):
    body = "include: [{quant.method: rtn, quant.bits: 8}]"
    a, b = grid_with(tmp_path / "a", body), grid_with(tmp_path / "deep" / "b", body)
    assert [c.key for c in a.cells] == [c.key for c in b.cells]
    assert [e.key for e in a.evals] == [e.key for e in b.evals]


def test_a_revised_method_gets_new_cell_keys_and_others_keep_theirs(tmp_path, monkeypatch):
    from llamalab.lab import settings as st
    from llamalab.quant.methods import get_method

    body = "include: [{quant.method: rtn, quant.bits: 4}, {quant.method: gptq, quant.bits: 4}]"
    before = [c.key for c in grid_with(tmp_path / "a", body).cells]
    assert before[0] == st.content_hash(grid_with(tmp_path / "a", body).cells[0].settings)  # revision 1: as ever
    monkeypatch.setattr(get_method("gptq"), "revision", 2)
    after = [c.key for c in grid_with(tmp_path / "b", body).cells]
    assert after[0] == before[0] and after[1] != before[1]


@pytest.mark.parametrize(
    "body,needles",
    [
        ("include: [{quant.method: zzq}]", ["unknown quantization method 'zzq'", "rtn"]),
        ("include: [{kv: nosuchkv}]", ["unknown KV-cache method", "dense"]),
        ("include: [{rope_scaling: warp}]", ["unknown rope_scaling 'warp'", "linear"]),
        ("include: [{flux: 3}]", ["unknown option 'flux'", "dtype"]),
        ("include: [{quant.method: gptq, quant.act_ordr: true}]", ["gptq: unknown option(s) act_ordr"]),
        ("include: [{dtype: fp8}]", ["unknown dtype 'fp8'"]),
        ("include: [{threads: many}]", ["threads='many' is not a number"]),
        ("surprise: 1", ["unknown top-level key(s) surprise"]),
    ],
)
def test_unknown_names_are_one_line_errors(tmp_path, body, needles):
    with pytest.raises(LlamalabError) as e:
        grid_with(tmp_path, body)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_unknown_evaluation_or_parameter(tmp_path):
    for evals, needle in (
        ("bleu: {}", "unknown evaluation 'bleu'"),
        ("bleu@x: {}", "unknown evaluation 'bleu@x'"),
        ("ppl@docs: {window: 3}", "unknown parameter(s) window"),
        ("ppl: {window: 3}", "unknown parameter(s) window"),
    ):
        path = tmp_path / "e.yaml"
        path.write_text(f"name: e\nevals:\n  {evals}\n")
        with pytest.raises(LlamalabError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            load_grid(path)
    path.write_text("name: e\nevals:\n  ppl: {data: no/such/file.txt}\n")
    with pytest.raises(LlamalabError, match="no such file"):
        load_grid(path)


def test_settings_a_method_rejects_are_that_cells_error(tmp_path):
    grid = grid_with(
        tmp_path,
        "include: [{quant.method: rtn, quant.bits: 9}, {quant.method: nf4, quant.nsamples: 8}, "
        "{quant.method: rtn}]",
    )
    errors = [c.error for c in grid.cells]
    assert "out of range" in errors[0] and "takes no calibration" in errors[1] and errors[2] is None


def test_bad_yaml_and_missing_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(LlamalabError, match="not valid YAML"):
        load_grid(path)
    path.write_text("evals: {ppl: {}}\n")
    with pytest.raises(LlamalabError, match="needs a `name`"):
        load_grid(path)
