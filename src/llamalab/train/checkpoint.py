"""Training checkpoints, written so that a kill at any moment leaves the last good one readable.

A checkpoint is a directory `checkpoints/step_N/` holding the trainable parameters (`model.safetensors`:
every weight for full fine-tuning, the adapters for LoRA), the optimizer state keyed by parameter name
(`optimizer.pt`, read back with `weights_only=True`), and `state.json` (step, data position, tokens seen,
the run's settings fingerprint). Everything is written into a temporary sibling, files fsynced, a
`manifest.json` (files and sizes) written last, and the directory renamed into place; `latest` names the
newest. Resuming picks the newest directory with a manifest whose files all have their recorded sizes;
leftovers of an interrupted save are removed. Checkpoints are global (full state dicts gathered on rank 0),
so a run resumes on any number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from llamalab.errors import LlamalabError

FILES = ("model.safetensors", "optimizer.pt", "state.json")


def save(root: Path, step: int, params: dict[str, torch.Tensor], optim: dict[str, Any], state: dict[str, Any],
         keep_last: int) -> Path:  # fmt: skip
    """Write checkpoint `step` under `root/checkpoints` atomically and prune to the newest `keep_last`."""
    from safetensors.torch import save_file

    base = root / "checkpoints"
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=base))
    try:
        unique, aliases = _dedup(params)
        state = {**state, "aliases": aliases}
        save_file(unique, str(tmp / "model.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        sizes = {name: (tmp / name).stat().st_size for name in FILES}
        for name in FILES:
            _fsync(tmp / name)
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "sizes": sizes}))
        _fsync(tmp / "manifest.json")
        if final.exists():  # a re-save of the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(base / "latest", final.name)
    for old in sorted(complete(root), key=_step)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Checkpoint directories whose manifest lists files of the recorded sizes."""
    out = []
    for d in (root / "checkpoints").glob("step_*"):
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            if all((d / n).stat().st_size == size for n, size in manifest["sizes"].items()):
                out.append(d)
        except (OSError, ValueError, KeyError):
            continue
    return out


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (stale temporary directories of an interrupted save are removed)."""
    for stale in (root / "checkpoints").glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = complete(root)
    return max(found, key=_step) if found else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable parameters, optimizer state, state.json) of a checkpoint."""
    from safetensors.torch import load_file

    params = load_file(str(path / "model.safetensors"))
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    for alias, name in state.pop("aliases", {}).items():
        params[alias] = params[name]
    return params, optim, state


def _dedup(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write once each (a tied head shares the embedding), and the names that alias them."""
    unique, aliases, seen = {}, {}, {}
    for name, t in params.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.contiguous()
    return unique, aliases


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_same_run(saved: dict[str, Any], fingerprint: dict[str, Any], path: Path) -> None:
    """Refuse to resume from a checkpoint of another model or other settings, naming what differs."""
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        raise LlamalabError(
            f"{path} was written by a run with other settings ({', '.join(differ)}); resume with the same "
            "config, or start a new run with another `out`"
        )
