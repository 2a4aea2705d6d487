"""llama.cpp as the reference for its own file format: its quantizer, its dequantization, its forward pass.

Used by the GGUF reader and GGUF export tests through the session fixture `llama_cpp` (tests/conftest.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import ModuleType

import numpy as np
import torch


def quantize(llama_cpp: ModuleType, src: Path, dst: Path, ftype: str, allow_requantize: bool = False) -> Path:
    """llama.cpp's `llama-quantize src dst FTYPE` (`ftype`: the LLAMA_FTYPE_* suffix, e.g. "MOSTLY_Q4_K_S")."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.allow_requantize = allow_requantize
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama.cpp could not quantize {src.name} to {ftype}"
    return dst


def dequantized(llama_cpp: ModuleType, src: Path, dst: Path) -> Path:
    """`src` with every tensor converted to F32 by llama.cpp's own dequantization (ggml's to_float)."""
    return quantize(llama_cpp, src, dst, "ALL_F32", allow_requantize=True)


def logits(llama_cpp: ModuleType, path: Path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of `ids` (teacher-forced), fp32 KV cache: (len(ids), vocab)."""
    f32 = llama_cpp.GGML_TYPE_F32
    model = llama_cpp.Llama(
        str(path), n_ctx=max(64, len(ids)), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
        type_k=f32, type_v=f32, n_threads=1, n_threads_batch=1, verbose=False,
    )  # fmt: skip
    try:
        model.eval(ids)
        return torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32))
    finally:
        model.close()
