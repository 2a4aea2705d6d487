"""`lm_eval --model llamalab` through lm-evaluation-harness' own command line, offline, on local tasks.

One run covers the three request types: loglikelihood (a multiple-choice task), loglikelihood_rolling (word
perplexity of Alice paragraphs) and generate_until (greedy continuation with stop strings). Each is checked,
document by document, against lm-evaluation-harness' own `hf` model running the same tasks on the same
weights (the default model converted to an HF directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamalab.eval.choice import evaluate_choice, read_jsonl_task

from .test_choice import task_yaml

LIMIT = 4


def test_the_startup_hook_registers_the_model():
    """The .pth hook (installed with the package) makes lm-eval's registry know `llamalab` lazily."""
    code = (
        "import sys; from lm_eval.api.registry import get_model; cls = get_model('llamalab'); "
        "print(cls.__module__, 'hf' in __import__('lm_eval.api.registry').api.registry.model_registry)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["llamalab.eval.lm_eval_adapter", "True"]


@pytest.fixture(scope="module")
def paragraphs(alice_text):
    paras = [" ".join(p.split()) for p in alice_text.split("\n\n")]
    return [p for p in paras if 200 <= len(p) <= 400][:2]


TASKS = ("ll_cloze", "ll_rolling", "ll_generate")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, cloze_jsonl, paragraphs):
    """The three local tasks: multiple choice, word perplexity of paragraphs, greedy continuation."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "cloze.yaml").write_text(task_yaml("ll_cloze", cloze_jsonl), encoding="utf-8")
    rolling = root / "rolling.jsonl"
    rolling.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    (tasks / "rolling.yaml").write_text(
        task_yaml(
            "ll_rolling",
            rolling,
            "loglikelihood_rolling",
            doc_to_text='""',
            doc_to_target="text",
            metric_list="\n  - metric: word_perplexity",
        ),
        encoding="utf-8",
    )
    gen = root / "gen.jsonl"
    gen.write_text(
        "".join(json.dumps({"prefix": p[:120], "rest": p[120:]}) + "\n" for p in paragraphs), encoding="utf-8"
    )
    (tasks / "gen.yaml").write_text(
        task_yaml(
            "ll_generate",
            gen,
            "generate_until",
            doc_to_text='"{{prefix}}"',
            doc_to_target='"{{rest}}"',
            generation_kwargs='\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false',
            metric_list="\n  - metric: exact_match",
        ),
        encoding="utf-8",
    )
    return tasks


def by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


def response(sample: dict) -> float:
    resp = sample["filtered_resps"][0]
    return float(resp[0] if isinstance(resp, list) else resp)


@pytest.fixture(scope="module")
def hf_reference(hf_model, hf_dir, task_dir):
    """lm-evaluation-harness' own `hf` model on the same weights (converted to an HF directory), same tasks:
    (results, samples by task)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(hf_dir), batch_size=8)
    out = simple_evaluate(
        model=lm,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=LIMIT,
        log_samples=True,
    )
    return out["results"], {name: by_doc(out["samples"][name]) for name in TASKS}


@pytest.mark.slow
def test_lm_eval_cli_runs_llamalab(tmp_path, smollm, cloze_jsonl, paragraphs, task_dir, hf_reference):
    out_dir = tmp_path / "out"
    lm_eval = Path(sys.executable).with_name("lm_eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            str(lm_eval),
            "--model",
            "llamalab",
            "--model_args",
            "pretrained=smollm2-135m,dtype=fp32",
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            str(task_dir),
            "--limit",
            str(LIMIT),
            "--batch_size",
            "8",
            "--device",
            "cpu",
            "--output_path",
            str(out_dir),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {
        name: by_doc(
            json.loads(line)
            for f in out_dir.rglob(f"samples_{name}_*.jsonl")
            for line in f.read_text().splitlines()
        )
        for name in TASKS
    }
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]
    ref_results, ref_samples = hf_reference
    # Every document scored, on both sides: a missing sample file must not make the comparisons vacuous.
    counts = {name: (len(samples[name]), len(ref_samples[name])) for name in TASKS}
    assert counts == {"ll_cloze": (LIMIT, LIMIT), "ll_rolling": (2, 2), "ll_generate": (2, 2)}, counts

    # loglikelihood: lm-eval's `hf` model's per-choice log-likelihoods and accuracy; and `llamalab eval
    # choice` computing the same task directly.
    assert results["ll_cloze"]["acc,none"] == ref_results["ll_cloze"]["acc,none"]
    for s, ref in zip(samples["ll_cloze"], ref_samples["ll_cloze"], strict=True):
        got = [float(r[0]) for r in s["filtered_resps"]]
        assert got == pytest.approx([float(r[0]) for r in ref["filtered_resps"]], rel=1e-4, abs=1e-3)
    ours = evaluate_choice(smollm, read_jsonl_task(cloze_jsonl)[:LIMIT])
    assert results["ll_cloze"]["acc,none"] == pytest.approx(ours.acc)
    for pred, s in zip(ours.predictions, samples["ll_cloze"], strict=True):
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(pred["loglikelihoods"], rel=1e-5)

    # loglikelihood_rolling: each paragraph's log-likelihood and the word perplexity, as lm-eval's `hf`
    # model computes them.
    for s, ref in zip(samples["ll_rolling"], ref_samples["ll_rolling"], strict=True):
        assert response(s) == pytest.approx(response(ref), rel=1e-4)
    assert results["ll_rolling"]["word_perplexity,none"] == pytest.approx(
        ref_results["ll_rolling"]["word_perplexity,none"], rel=1e-4
    )

    # generate_until: lm-eval's `hf` model's greedy continuation, cut at the first stop string.
    for s, ref in zip(samples["ll_generate"], ref_samples["ll_generate"], strict=True):
        assert s["resps"][0][0] == ref["resps"][0][0] and s["resps"][0][0]
