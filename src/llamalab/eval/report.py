"""Evaluation reports: one JSON per run, an optional markdown results table, PNG plots.

The JSON holds what is needed to trust or reproduce a number: the model (path, parameters, dtype, context,
RoPE scaling), every setting (the model options and the evaluation's own), the metrics, the versions of the
libraries involved, and the machine. Files are written to a temporary name and renamed, so an interrupted
run never leaves half a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from llamalab.io.modes import umask_mode
from llamalab.model_options import ModelOptions

LIBRARIES = [
    "llamalab",
    "torch",
    "numpy",
    "tokenizers",
    "gguf",
    "safetensors",
    "transformers",
    "datasets",
    "lm-eval",
]


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that can change a number (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_info(llm) -> dict[str, Any]:
    config = llm.model.config
    return {
        "name": llm.name,
        "source": str(getattr(llm.checkpoint, "source", llm.name)),
        "format": getattr(llm.checkpoint, "format", None),
        "parameters": llm.model.num_parameters(),
        "dtype": str(llm.dtype).replace("torch.", ""),
        "context": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
    }


def build_report(
    kind: str, llm, opts: ModelOptions, settings: dict[str, Any], metrics: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The report of one evaluation run."""
    return {
        "eval": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info(llm),
        "model_options": opts.to_dict(),
        "settings": settings,
        "metrics": metrics,
        **extra,
        "versions": versions(),
        "machine": machine(opts.device),
    }


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report: dict[str, Any], path: Path) -> None:
    atomic_write(Path(path), (json.dumps(report, indent=2, default=str) + "\n").encode())


TABLE_HEADER = "| date | eval | model | settings | metrics |\n|---|---|---|---|---|\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _changed_options(report: dict[str, Any]) -> dict[str, Any]:
    defaults = ModelOptions().to_dict()
    opts = report.get("model_options", {})
    return {k: v for k, v in opts.items() if k != "model" and v != defaults.get(k)}


def markdown_row(report: dict[str, Any], metric_keys: list[str] | None = None) -> str:
    """One table row: date, eval, model, settings (non-default model options + eval settings), metrics."""
    settings = {**_changed_options(report), **{k: v for k, v in report["settings"].items() if v is not None}}
    metrics = report["metrics"]
    if metric_keys:
        metrics = {k: metrics[k] for k in metric_keys if k in metrics}
    cells = [
        report["created"][:10],
        report["eval"],
        report["model"]["name"],
        "; ".join(f"{k}={_fmt(v)}" for k, v in settings.items()),
        "; ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()),
    ]
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |\n"


def append_markdown(path: Path, report: dict[str, Any], metric_keys: list[str] | None = None) -> None:
    """Append the report's row to the results table at `path` (created with a header if missing)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if not old.strip():
        old = TABLE_HEADER
    elif not old.endswith("\n"):
        old += "\n"
    atomic_write(path, (old + markdown_row(report, metric_keys)).encode())


# --- plots --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_curve(
    xs: list[float],
    series: dict[str, list[float]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = (0.0, 1.02),
    log2x: bool = True,
) -> None:
    """Lines (one per series) over `xs`, e.g. passkey accuracy against context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log2x and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x / 1024:g}K" if x >= 1024 and x % 256 == 0 else f"{x:g}" for x in xs])
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_heatmap(
    matrix: list[list[float]],
    rows: list[str],
    cols: list[str],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
) -> None:
    """A [0, 1] heat map with the value written in each cell (e.g. needle hit rate, depth x length)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.45 * len(rows) + 1.8))
    im = ax.imshow(matrix, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)
    plt.close(fig)
