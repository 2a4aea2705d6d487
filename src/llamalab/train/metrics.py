"""Watching a run: a progress bar (loss, learning rate, tokens/s, ETA), `metrics.jsonl` beside the
checkpoints, optional TensorBoard. Only rank 0 writes. On resume, lines past the restored step are dropped,
so the log of a resumed run equals an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, start_step: int, total: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # resume: keep what the restored step had logged
            kept = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start_step, unit="step", desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from llamalab.errors import LlamalabError

                raise LlamalabError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if "loss" in record and self.bar is not None:
            self.bar.update(1)
            post = {
                "loss": f"{record['loss']:.4f}",
                "lr": f"{record['lr']:.2e}",
                "tok/s": f"{record['tokens_per_s']:.0f}",
            }
            if "eval_loss" in record:
                post["eval"] = f"{record['eval_loss']:.4f}"
            self.bar.set_postfix(post)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.bar.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        from llamalab.errors import LlamalabError

        raise LlamalabError(f"{run_dir}: no metrics.jsonl (not a training run directory?)")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
