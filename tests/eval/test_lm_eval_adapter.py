"""`lm_eval --model llamalab` through lm-evaluation-harness' own command line, offline, on local tasks.

One run covers the three request types: loglikelihood (a multiple-choice task), loglikelihood_rolling (word
perplexity of Alice paragraphs) and generate_until (greedy continuation with stop strings). Each is
checked against llamalab computing the same quantity directly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalab.eval.choice import evaluate_choice, read_jsonl_task
from llamalab.eval.forward import Forward, prefix_token_id

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


@pytest.mark.slow
def test_lm_eval_cli_runs_llamalab(tmp_path, smollm, cloze_jsonl, paragraphs):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "cloze.yaml").write_text(task_yaml("ll_cloze", cloze_jsonl), encoding="utf-8")
    rolling = tmp_path / "rolling.jsonl"
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
    gen = tmp_path / "gen.jsonl"
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
            "ll_cloze,ll_rolling,ll_generate",
            "--include_path",
            str(tasks),
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
        name: sorted(
            (
                json.loads(line)
                for f in out_dir.rglob(f"samples_{name}_*.jsonl")
                for line in f.read_text().splitlines()
            ),
            key=lambda s: s["doc_id"],
        )
        for name in ("ll_cloze", "ll_rolling", "ll_generate")
    }
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]

    # loglikelihood: the same per-choice log-likelihoods and accuracy as `llamalab eval choice`.
    ours = evaluate_choice(smollm, read_jsonl_task(cloze_jsonl)[:LIMIT])
    assert results["ll_cloze"]["acc,none"] == pytest.approx(ours.acc)
    for pred, s in zip(ours.predictions, samples["ll_cloze"]):
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(pred["loglikelihoods"], rel=1e-5)

    # loglikelihood_rolling: each paragraph fits one window, conditioned on the prefix token.
    fwd = Forward(smollm)
    prefix = prefix_token_id(smollm.tokenizer)
    lls = []
    for p, s in zip(paragraphs, samples["ll_rolling"]):
        lp, _ = fwd.target_logprobs(torch.tensor([[prefix, *smollm.encode(p)]]))
        lls.append(float(lp.double().sum()))
        resp = s["filtered_resps"][0]
        assert float(resp[0] if isinstance(resp, list) else resp) == pytest.approx(lls[-1], rel=1e-5)
    words = sum(len(p.split()) for p in paragraphs)
    assert results["ll_rolling"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(lls) / words), rel=1e-5
    )

    # generate_until: llamalab's greedy continuation, cut at the first stop string.
    for p, s in zip(paragraphs, samples["ll_generate"]):
        out = smollm.decode(fwd.greedy(smollm.encode(p[:120]), 12, set(smollm.eos_token_ids)))
        expected = out.split("\n")[0].split(".")[0]
        assert s["resps"][0][0] == expected
