"""Reading llama.cpp GGUF files into HF-named float tensors.

The `gguf` package (llama.cpp's own Python reader) parses the header and dequantizes every block format it
knows (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, the I-quants, ...). What this module adds:

- the name map from GGUF (`blk.N.attn_q`) to HF (`model.layers.N.self_attn.q_proj`);
- undoing `convert_hf_to_gguf.py`'s Q/K row permutation, which turns HF's rotate-half RoPE layout into
  llama.cpp's interleaved pairs (research/engine_style.md §2.3);
- validation: a truncated or corrupt file is reported by name, never as a numpy traceback.
"""

from __future__ import annotations

import re
from collections.abc import Set
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.errors import CheckpointError

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None for tensors we derive elsewhere."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else None


def gguf_name(hf: str) -> str | None:
    """Inverse of `hf_name` (used by the GGUF exporter)."""
    for g, h in _TOP_NAMES.items():
        if hf.startswith(h + "."):
            return g + hf[len(h) :]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m:
        inverse = {v: k for k, v in _BLOCK_NAMES.items()}
        if m.group(2) in inverse:
            return f"blk.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: interleaved RoPE pairs back to HF's rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """`convert_hf_to_gguf.py`'s permutation: HF rotate-half rows to llama.cpp's interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFFile:
    """A parsed GGUF file: metadata as Python values, tensors dequantized on request."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError/IndexError/... on damaged headers
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None
        self._check_complete()
        self.metadata = {name: _field_value(field) for name, field in self.reader.fields.items()}

    def _check_complete(self) -> None:
        from gguf import GGML_QUANT_SIZES

        size = self.path.stat().st_size
        for t in self.reader.tensors:
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            expected = int(np.prod(t.shape)) // block * type_size
            if t.data_offset + expected > size or t.data.nbytes != expected:
                raise CheckpointError(
                    f"{self.path}: file is truncated (tensor {t.name!r} needs bytes up to "
                    f"{t.data_offset + expected}, file has {size}); re-download or re-export it"
                )

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in self.reader.tensors}

    def _dequantize(self, t: Any) -> torch.Tensor:
        from gguf.quants import dequantize

        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be dequantized"
            ) from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest dimension first
        return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a writable copy

    def tensor(self, name: str) -> torch.Tensor | None:
        """One tensor by its GGUF name, dequantized to fp32 (None if absent)."""
        found = [t for t in self.reader.tensors if t.name == name]
        return self._dequantize(found[0]) if found else None

    def stored_linears(self, n_heads: int, n_kv_heads: int) -> dict[str, Any]:
        """The modules whose blocks the native kernels run as stored (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K; no bias),
        by HF module name: the linear layers as `GGUFLinear`, the head included, and a token embedding in such
        blocks as a `QuantEmbedding` of its rows (`model.embed_tokens`), which a tied head shares (`lm_head` is
        then the same module). Q/K rows un-permuted (a permutation of whole rows of blocks: no value changes)."""
        from llamalab.quant.embedding import QuantEmbedding
        from llamalab.quant.gguf_linear import LAYOUTS, GGUFLinear

        names = set(self.tensor_names())
        out: dict[str, Any] = {}
        for t in self.reader.tensors:
            kind = t.tensor_type.name
            name = hf_name(t.name)
            if kind not in LAYOUTS or name is None or len(t.shape) != 2:
                continue
            if not name.endswith(("_proj.weight", "lm_head.weight", "embed_tokens.weight")):
                continue
            if t.name.removesuffix(".weight") + ".bias" in names:
                continue  # a layer with a bias stays dense (GGUFLinear holds none)
            rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists the fastest dimension first
            blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))
            if t.name.endswith("attn_q.weight"):
                blocks = unpermute_qk(blocks, n_heads)
            elif t.name.endswith("attn_k.weight"):
                blocks = unpermute_qk(blocks, n_kv_heads)
            module = GGUFLinear.from_blocks(blocks.numpy(), kind, rows, cols)
            if t.name == "token_embd.weight":
                out["model.embed_tokens"] = QuantEmbedding(module)
                if "output.weight" not in names:
                    out["lm_head"] = module  # a tied head reads the embedding's blocks
            else:
                out[name.removesuffix(".weight")] = module
        return out

    def state_dict(
        self, n_heads: int, n_kv_heads: int, dtype: torch.dtype = torch.float32, skip: Set[str] = frozenset()
    ) -> dict[str, torch.Tensor]:
        """Every model tensor but those named in `skip` dequantized to `dtype`, under HF names, with Q/K rows
        un-permuted."""
        out: dict[str, torch.Tensor] = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None or name in skip:
                continue
            w = self._dequantize(t)
            if t.name.endswith("attn_q.weight"):
                w = unpermute_qk(w, n_heads)
            elif t.name.endswith("attn_k.weight"):
                w = unpermute_qk(w, n_kv_heads)
            out[name] = w.to(dtype)
        return out


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # an unreadable optional field should not stop loading; required ones are checked
        return None
