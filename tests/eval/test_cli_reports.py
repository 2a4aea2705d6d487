"""`llamalab eval ppl/choice/passkey/needle` run to the end: the printed summary, the JSON report, the markdown
row and the plot, and metrics that are those of the computation they report (on the default model)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamalab.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
TIMINGS = ("seconds", "tokens_per_s")


def run_eval(capsys, tmp_path, *args: str) -> tuple[str, dict, list[str]]:
    """Run `llamalab eval ARGS --output-json --results-md`; return the printed summary, the JSON report and
    the markdown table's lines (a header and the row)."""
    out, md = tmp_path / "report.json", tmp_path / "results.md"
    assert main(["eval", *args, "--output-json", str(out), "--results-md", str(md)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["eval"] == args[0] and report["model"]["name"] == "smollm2-135m"
    assert {"torch", "llamalab"} <= set(report["versions"]) and report["machine"]
    assert report["model_options"]["dtype"] == "fp32"
    lines = md.read_text().splitlines()
    assert lines[0] == "| date | eval | model | settings | metrics |" and len(lines) == 3
    assert f"| {args[0]} | smollm2-135m | " in lines[2]
    return printed, report, lines


def without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.slow
def test_ppl_reports_the_perplexity_of_its_windows(tmp_path, capsys, shared_model, smollm, alice_text):
    data = tmp_path / "alice.txt"
    data.write_text(alice_text[:20000], encoding="utf-8")
    printed, report, lines = run_eval(
        capsys, tmp_path, "ppl", "--data", str(data), "--seq-len", "256", "--max-windows", "3"
    )
    ids = smollm.encode(alice_text[:20000])
    assert report["settings"]["data_tokens"] == len(ids) and report["settings"]["seq_len"] == 256
    windows = torch.tensor(ids[: 3 * 256]).view(3, 256)  # GPTQ's protocol: non-overlapping windows
    with torch.no_grad():
        logits = smollm.model(windows)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    metrics = report["metrics"]
    assert metrics["windows"] == 3 and metrics["tokens"] == 3 * 255
    assert metrics["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert printed.startswith(f"ppl {metrics['ppl']:.4f}")
    assert f"ppl={metrics['ppl']:.4g}" in lines[2] and "seq_len=256" in lines[2]


@pytest.mark.slow
def test_choice_reports_accuracy_and_predictions(tmp_path, capsys, shared_model, smollm, cloze_jsonl):
    from llamalab.eval.choice import evaluate_choice, read_jsonl_task

    printed, report, lines = run_eval(capsys, tmp_path, "choice", "--task", str(cloze_jsonl), "--limit", "4")
    direct = evaluate_choice(smollm, read_jsonl_task(cloze_jsonl)[:4])
    assert report["metrics"]["docs"] == 4 and len(report["predictions"]) == 4
    assert report["metrics"]["acc"] == direct.acc and report["metrics"]["acc_norm"] == direct.acc_norm
    for got, want in zip(report["predictions"], direct.predictions, strict=True):
        assert got["loglikelihoods"] == pytest.approx(want["loglikelihoods"], rel=1e-6)
    assert "acc" in printed and "acc=" in lines[2] and "limit=4" in lines[2]


@pytest.mark.slow
def test_passkey_reports_accuracy_per_length_and_plots_it(tmp_path, capsys, shared_model, smollm):
    from llamalab.eval.passkey import evaluate_passkey

    plot = tmp_path / "passkey.png"
    printed, report, lines = run_eval(
        capsys, tmp_path, "passkey", "--lengths", "320", "--trials", "2", "--plot", str(plot)
    )
    direct = evaluate_passkey(smollm, [320], trials=2, seed=42, max_new_tokens=10)
    assert report["settings"]["lengths"] == [320] and len(report["records"]) == 2
    assert without(report["metrics"], TIMINGS) == without(direct.metrics(), TIMINGS)
    assert plot.read_bytes()[:8] == PNG
    assert "length    320: accuracy" in printed and "accuracy=" in lines[2]


@pytest.mark.slow
def test_needle_reports_its_grid_and_plots_it(tmp_path, capsys, shared_model, smollm, alice_text):
    from llamalab.eval.needle import evaluate_needle

    plot = tmp_path / "needle.png"
    printed, report, lines = run_eval(
        capsys, tmp_path, "needle", "--lengths", "320", "--depths", "0,100", "--max-new-tokens", "24",
        "--plot", str(plot),
    )  # fmt: skip
    direct = evaluate_needle(smollm, alice_text, [320], [0, 100], max_new_tokens=24)
    assert report["settings"]["lengths"] == [320] and report["settings"]["depths"] == [0, 100]
    assert without(report["metrics"], TIMINGS) == without(direct.metrics(), TIMINGS)
    assert plot.read_bytes()[:8] == PNG
    assert "needle" in lines[2]
