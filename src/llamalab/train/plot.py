"""`llamalab train plot RUN_DIR`: training loss, learning rate and held-out loss of a run as one PNG."""

from __future__ import annotations

from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.train.metrics import read_metrics


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    if not train:
        raise LlamalabError(f"{run_dir}: metrics.jsonl has no training steps yet")
    evals = [r for r in records if "eval_loss" in r]
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(Path(run_dir).resolve().name)
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    out = Path(out or Path(run_dir) / "curves.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
