"""Hugging Face model directories: read (config, single or sharded safetensors, tokenizer, generation
config) and write (what `llamalab convert` produces and transformers' `from_pretrained` reads back).

Loading never executes code from a file: safetensors only, or `torch.load(weights_only=True)` for old
`pytorch_model.bin` checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from llamalab.errors import CheckpointError
from llamalab.io.modes import umask_mode
from llamalab.io.tokenizer import _read_json


def read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: no config.json; is this a Hugging Face model directory?")
    return _read_json(cfg)


def read_generation_config(path: Path) -> dict[str, Any]:
    gc = path / "generation_config.json"
    return _read_json(gc) if gc.exists() else {}


def weight_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: the sharded index's files, one safetensors, or .bin files."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} listed in {index.name} is missing")
        return [path / s for s in shards]
    single = sorted(path.glob("*.safetensors"))
    if single:
        return single
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise CheckpointError(f"{path}: no *.safetensors (or pytorch_model.bin) weights found")


def read_state_dict(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, optionally cast to `dtype`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
        except (SafetensorError, RuntimeError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{f}: cannot read weights, the file is truncated or corrupt ({e})"
            ) from None
        out.update(part)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def write_hf_dir(
    out: Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer=None,
    generation_config: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write an HF model directory atomically: everything goes to a temporary sibling, then is renamed,
    so an interrupted conversion never leaves a half-written model behind."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: directory exists and is not empty; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # safetensors refuses shared storage (tied weights): store contiguous copies of what we write.
        tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():  # mkdtemp made the directory 0700 and safetensors writes 0600
            umask_mode(f, f.is_dir())
        umask_mode(tmp, directory=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
