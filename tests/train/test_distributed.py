"""Data parallelism with real processes (torchrun, gloo): DDP and FSDP2 on two processes give one process's
losses for the same global batch, and a checkpoint written by two processes resumes on one."""

import subprocess
import sys

import pytest

from llamalab.train import load_config, train
from llamalab.train.metrics import read_metrics
from tests.train.conftest import tiny_config


def torchrun(overrides: list[str], resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "llamalab", "train", *overrides, *(["--resume"] if resume else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def curve(run_dir) -> list[tuple[float, float | None]]:
    return [(r["loss"], r.get("eval_loss")) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_with_the_same_global_batch(tiny_dir, tmp_path, strategy):
    common = {"steps": 4, "eval.every": 2, "lora.r": 4, "checkpoint.every": 2}
    torchrun(
        [*tiny_config(tiny_dir, tmp_path / "two", **common), "batch.accumulate=1", f"distributed={strategy}"]
    )
    train(load_config(None, tiny_config(tiny_dir, tmp_path / "one", **common, **{"batch.accumulate": 2})))
    two, one = curve(tmp_path / "two"), curve(tmp_path / "one")
    assert len(two) == len(one) == 4
    for (a, ea), (b, eb) in zip(two, one):
        assert a == pytest.approx(b, rel=1e-5) and (ea is None) == (eb is None)
        assert ea is None or ea == pytest.approx(eb, rel=1e-5)


def test_a_checkpoint_of_two_processes_resumes_on_one(tiny_dir, tmp_path):
    run, alone = tmp_path / "run", tmp_path / "alone"
    common = {"eval.every": 0, "checkpoint.every": 4, "schedule.decay": "constant"}  # LR not tied to `steps`
    torchrun([*tiny_config(tiny_dir, run, steps=4, **common), "batch.accumulate=1", "distributed=fsdp"])
    one = {**common, "steps": 8, "batch.accumulate": 2}  # the same global batch on one process
    train(load_config(None, tiny_config(tiny_dir, run, **one)), resume=True)
    train(load_config(None, tiny_config(tiny_dir, alone, **one)))
    assert len(curve(run)) == len(curve(alone)) == 8
    for (a, _), (b, _) in zip(curve(run), curve(alone)):
        assert a == pytest.approx(b, rel=1e-5)
