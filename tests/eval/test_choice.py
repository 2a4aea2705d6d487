"""Multiple choice: the local JSONL format, lm-eval's metrics, and parity with lm-eval's own `hf` model."""

from __future__ import annotations

import json

import pytest

from llamalab.errors import LlamalabError
from llamalab.eval.choice import (
    _mean_stderr,
    cloze_docs,
    evaluate_choice,
    load_task,
    partial_doc,
    read_jsonl_task,
    standard_doc,
)


def test_jsonl_format(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"context": "Question: 2+2?\nAnswer:", "choices": ["4", "5"], "gold": 0},
        {"context": "The sky is", "choices": ["green", "blue"], "gold": "blue"},
        {
            "contexts": ["Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo"],
            "continuation": "was kind.",
            "gold": 0,
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = read_jsonl_task(path)
    assert docs[0] == standard_doc("Question: 2+2?\nAnswer:", ["4", "5"], 0)
    assert docs[0].continuations == [" 4", " 5"]
    assert docs[1].gold == 1
    assert docs[2] == partial_doc(rows[2]["contexts"], "was kind.", 0)
    assert (
        docs[2].continuations == [" was kind.", " was kind."] and docs[2].norm_strings == rows[2]["contexts"]
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "a", "choices": ["b", "c"], "gold": 0', r"t.jsonl:2: not valid JSON"),
        ('{"context": "a", "choices": ["b"], "gold": 0}', r"t.jsonl:2: needs 'context'.*'choices'"),
        ('{"context": "a", "choices": ["b", "c"]}', r"t.jsonl:2: missing 'gold'"),
        ('{"context": "a", "choices": ["b", "c"], "gold": 2}', r"t.jsonl:2: 'gold' 2 is out of range"),
        ('{"context": "a", "choices": ["b", "c"], "gold": "d"}', r"t.jsonl:2: 'gold' 'd' is not one of"),
        ('["a", "b"]', r"t.jsonl:2: each line must be a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "x", "choices": ["y", "z"], "gold": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LlamalabError, match=message):
        read_jsonl_task(path)


def test_empty_task_and_unknown_task(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(LlamalabError, match="e.jsonl: the file is empty"):
        read_jsonl_task(tmp_path / "e.jsonl")
    with pytest.raises(LlamalabError, match="not a file and not a built-in task.*hellaswag"):
        load_task("no_such_task")


def test_offline_cloze_task_is_deterministic(alice_text):
    a, b = cloze_docs(alice_text, n=20, seed=1), cloze_docs(alice_text, n=20, seed=1)
    assert a == b and len(a) == 20
    for d in a:
        assert len(d.continuations) == 4 and 0 <= d.gold < 4
        assert d.contexts[0] + " " + d.norm_strings[d.gold] in " ".join(alice_text.split())


def test_stderr_is_lm_evals():
    assert _mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.25 / 4) ** 0.5)


@pytest.mark.slow
def test_matches_lm_eval_hf_model(smollm, hf_model, hf_dir, cloze_jsonl, tmp_path):
    """Our acc/acc_norm equal lm-evaluation-harness' `hf` model on the converted weights, doc by doc."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    (tmp_path / "alice_cloze_local.yaml").write_text(
        task_yaml("alice_cloze_local", cloze_jsonl), encoding="utf-8"
    )
    lm = HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(hf_dir), batch_size=8)
    out = simple_evaluate(
        model=lm,
        tasks=["alice_cloze_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    ref = out["results"]["alice_cloze_local"]
    ours = evaluate_choice(smollm, read_jsonl_task(cloze_jsonl))
    assert ours.docs == 12
    assert ours.acc == pytest.approx(ref["acc,none"], abs=1e-12)
    assert ours.acc_norm == pytest.approx(ref["acc_norm,none"], abs=1e-12)
    samples = sorted(out["samples"]["alice_cloze_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours.predictions) == 12  # every document compared, none silently dropped
    for pred, sample in zip(ours.predictions, samples, strict=True):
        ref_lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert pred["loglikelihoods"] == pytest.approx(ref_lls, rel=1e-4, abs=1e-3)


def task_yaml(name: str, data_file, output_type: str = "multiple_choice", **fields: str) -> str:
    """An lm-eval task over a local JSON(L) file."""
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data_file}",
        f"output_type: {output_type}",
        "test_split: test",
    ]
    if output_type == "multiple_choice":
        fields = {
            "doc_to_text": '"{{context}}"',
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": "\n  - metric: acc\n  - metric: acc_norm",
            **fields,
        }
    lines += [f"{k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\nmetadata:\n  version: 1.0\n"
