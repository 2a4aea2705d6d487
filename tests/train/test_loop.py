"""The training loop end to end on a tiny model: each objective learns, the output loads everywhere, a
killed run resumes exactly, bad input is named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llamalab
from llamalab.errors import LlamalabError
from llamalab.train import load_config, train
from llamalab.train.metrics import read_metrics
from tests.train.conftest import tiny_config


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_continued_pretraining_learns_and_exports_a_model_every_tool_loads(tiny_dir, tmp_path):
    out = tmp_path / "clm"
    seen = []
    result = train(
        load_config(None, tiny_config(tiny_dir, out, steps=12, **{"data.eval": "alice-heldout"})),
        on_step=seen.append,
    )
    curve = losses(out)
    assert len(curve) == 12 and curve[-1] < curve[0]
    assert [r["loss"] for r in seen] == curve  # the Python callback sees each step's logged record
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_10", "step_12"]  # keep 2
    trained = llamalab.load(str(result.export))
    assert trained.generate("Alice", max_new_tokens=3) is not None
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(result.export)).eval()
    ids = torch.tensor([trained.encode("Alice was beginning to get very tired")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained.model(ids), atol=1e-4, rtol=1e-4)


def test_sft_with_lora_and_qlora_writes_adapters_and_a_merged_model(tiny_dir, tmp_path, chat_jsonl):
    for kind, extra in (("lora", {}), ("qlora", {"qlora.block_size": 32})):
        out = tmp_path / kind
        overrides = tiny_config(tiny_dir, out, objective="sft", steps=8, **{
            "data.train": f"[{{source: {chat_jsonl}}}]", "data.packing": "false", "lora.r": 4,
            "lora.targets": "[q_proj, v_proj, down_proj]", **({"qlora": "true"} | extra if kind == "qlora" else {})})  # fmt: skip
        result = train(load_config(None, overrides))
        assert losses(out)[-1] < losses(out)[0]
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        merged = llamalab.load(str(result.export))  # dense: adapters merged, an NF4 base dequantized
        assert merged.model.num_parameters() == llamalab.load(str(tiny_dir)).model.num_parameters()
        assert isinstance(merged.chat("Say Alice.", max_new_tokens=4), str)


def test_dpo_raises_the_reward_margin(tiny_dir, tmp_path, pairs_jsonl):
    out = tmp_path / "dpo"
    overrides = tiny_config(tiny_dir, out, objective="dpo", steps=10, **{
        "data.train": f"[{{source: {pairs_jsonl}}}]", "data.seq_len": 40, "dpo.beta": 0.5, "optim.lr": 1e-2,
        "data.eval_pairs": str(pairs_jsonl)})  # fmt: skip
    train(load_config(None, overrides))
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["loss"] < 0.6
    # The pairs scored as held-out pairs every eval.every steps, beside the held-out text.
    evals = [r for r in steps if "eval_reward_margin" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 10] and all("eval_loss" in r for r in evals)
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] > 0
    assert evals[-1]["eval_dpo_loss"] < evals[0]["eval_dpo_loss"] < 0.6931
    assert evals[-1]["eval_reward_accuracy"] == 1.0


def step_of(manifest: Path) -> int:
    return int(manifest.parent.name.removeprefix("step_"))


def test_a_killed_run_resumes_exactly(tiny_dir, tmp_path):
    common = {"steps": 60, "checkpoint.every": 1, "eval.every": 0, "lora.r": 4, "lora.dropout": 0.1}
    whole = tmp_path / "whole"
    train(load_config(None, tiny_config(tiny_dir, whole, **common)))
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "llamalab", "train", *tiny_config(tiny_dir, killed, **common)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 300
    # Kill once any checkpoint at step 5 or later is complete (keep_last deletes older ones, so on a fast
    # machine a poll could miss step 5 itself).
    while not any(step_of(m) >= 5 for m in (killed / "checkpoints").glob("step_*/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert losses(killed)[:5] == losses(whole)[:5]
    train(load_config(None, tiny_config(tiny_dir, killed, **common)), resume=True)
    assert losses(killed) == losses(whole)  # every later step, exactly (one process, same threads)
    a = torch.load(whole / "checkpoints" / "step_60" / "optimizer.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "step_60" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(x["exp_avg"], b["state"][k]["exp_avg"]) for k, x in a["state"].items())


def test_bad_input_is_named_and_leaves_no_checkpoint(tiny_dir, tmp_path, chat_jsonl):
    out = tmp_path / "run"
    train(load_config(None, tiny_config(tiny_dir, out, steps=2)))
    with pytest.raises(LlamalabError, match="already holds checkpoints; pass --resume"):
        train(load_config(None, tiny_config(tiny_dir, out, steps=2)))
    with pytest.raises(LlamalabError, match=r"other settings \(optim\)"):
        train(load_config(None, tiny_config(tiny_dir, out, steps=4, **{"optim.lr": 1e-4})), resume=True)
    with pytest.raises(LlamalabError, match="match no module"):
        train(load_config(None, tiny_config(tiny_dir, tmp_path / "x", **{"lora.targets": "[nope]"})))
    with pytest.raises(LlamalabError, match=r"seq_len 512 is beyond the model's context of 256"):
        train(load_config(None, tiny_config(tiny_dir, tmp_path / "y", **{"data.seq_len": 512})))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bf16_autocast_checkpointing_and_a_choice_task_during_training(tiny_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"Alice met the {w}", "choices": [" Queen", " tea"], "gold": 0}) + "\n"
                            for w in ("Cat", "Hatter", "Duchess")))  # fmt: skip
    out = tmp_path / "bf16"
    overrides = tiny_config(tiny_dir, out, steps=4, autocast="bf16", activation_checkpointing="true",
                            **{"eval.choice_task": str(task), "eval.every": 2})  # fmt: skip
    train(load_config(None, overrides))
    records = [r for r in read_metrics(out) if "choice_acc" in r]
    assert [r["step"] for r in records] == [2, 4] and all(0 <= r["choice_acc"] <= 1 for r in records)
    assert all(r["loss"] == r["loss"] for r in read_metrics(out))  # finite under bf16


def test_cli_trains_and_plots(tiny_dir, tmp_path, capsys):
    from llamalab.cli import main

    out = tmp_path / "cli"
    assert main(["train", *tiny_config(tiny_dir, out, steps=3)]) == 0
    assert main(["train", "plot", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 1000
    assert main(["train", "optim.lr"]) == 1
    assert "error: override 'optim.lr' is not KEY=VALUE" in capsys.readouterr().err
