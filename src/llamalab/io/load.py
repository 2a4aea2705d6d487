"""Resolve a model name (alias, path, hub id) and read its checkpoint: config, weights, tokenizer, and the
generation defaults its authors ship (EOS ids, sampling settings)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.errors import CheckpointError
from llamalab.io import hf
from llamalab.io.gguf import GGUFFile
from llamalab.io.registry import ALIASES, resolve_alias
from llamalab.io.tokenizer import Tokenizer
from llamalab.model.config import ModelConfig
from llamalab.model.registry import config_from_gguf, config_from_hf
from llamalab.model.rope_types import llama3_scaling_from_factors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """Everything read from one checkpoint, before a model is built from it."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    generation: dict[str, Any]  # generation_config.json-style defaults
    source: Path
    format: str  # "hf" | "gguf"
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF storage type per tensor
    # GGUF linear layers kept as stored (load_checkpoint(stored=True)), by module name; not in state_dict
    stored: dict[str, nn.Module] = field(default_factory=dict)
    raw_config: dict[str, Any] = field(default_factory=dict)  # config.json as read (quantization etc.)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token that ends generation: generation_config's list plus the tokenizer's EOS."""
        ids = self.generation.get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids


def resolve(name: str) -> Path:
    """A local path for `name`: an alias, an existing file or directory, or (with huggingface_hub and a
    network) a hub repository id."""
    alias = resolve_alias(name)
    if alias is not None:
        return alias
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return _from_hub(name)
    raise CheckpointError(
        f"{name}: no such file or directory, and not a known alias (known: {', '.join(sorted(ALIASES))})"
    )


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not a local path; to fetch it from the Hugging Face hub, `pip install huggingface_hub`"
        ) from None
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
        )
    except Exception as e:
        raise CheckpointError(
            f"{repo_id}: could not download from the hub ({type(e).__name__}); offline?"
        ) from None


def load_checkpoint(name: str, dtype: torch.dtype = torch.float32, stored: bool = False) -> Checkpoint:
    """Read a checkpoint by alias, path (HF directory or .gguf file) or hub id. `stored`: a GGUF file's
    Q4_0/Q4_1/Q8_0/Q4_K/Q6_K linear layers come as stored modules (`Checkpoint.stored`,
    `GGUFFile.stored_linears`),
    never dequantized; every other tensor is in `state_dict`."""
    path = resolve(name)
    if path.is_dir():
        return _load_hf(path, dtype)
    if is_gguf(path):
        return _load_gguf(path, dtype, stored)
    raise CheckpointError(f"{path}: not a model directory or a .gguf file")


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (by its suffix or its magic bytes)."""
    if path.is_dir():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _load_hf(path: Path, dtype: torch.dtype) -> Checkpoint:
    raw = hf.read_config(path)
    config = config_from_hf(raw, source=str(path / "config.json"))
    tokenizer = Tokenizer.from_hf_dir(path)
    generation = hf.read_generation_config(path)
    generation.setdefault("eos_token_id", raw.get("eos_token_id"))
    state = hf.read_state_dict(path, dtype)
    return Checkpoint(config, state, tokenizer, generation, path, "hf", raw_config=raw)


def _load_gguf(path: Path, dtype: torch.dtype, stored: bool) -> Checkpoint:
    f = GGUFFile(path)
    config = config_from_gguf(f.metadata, source=str(path))
    config.tie_word_embeddings = "output.weight" not in f.tensor_names()
    tokenizer = Tokenizer.from_gguf(f.metadata, source=str(path))
    eos = [f.metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    generation = {"eos_token_id": sorted({i for i in eos if i is not None})}
    heads = config.num_attention_heads, config.num_key_value_heads
    modules = f.stored_linears(*heads) if stored else {}
    state = f.state_dict(*heads, dtype, skip={name + ".weight" for name in modules})
    factors = f.tensor("rope_freqs.weight")
    if factors is not None:  # Llama 3.x files carry their RoPE scaling as per-frequency divisors
        config.rope_scaling = llama3_scaling_from_factors(
            factors.tolist(), config.head_dim, config.rope_theta
        )
    return Checkpoint(
        config, state, tokenizer, generation, path, "gguf", tensor_types=f.tensor_types(), stored=modules
    )
