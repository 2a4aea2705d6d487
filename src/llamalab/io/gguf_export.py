"""`llamalab quant export`: write any loadable model as a llama.cpp GGUF (f16, q8_0 or q4_0).

The file is what llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize` would produce for a LLaMA model:
`llama.*` hyper-parameters, the tokenizer as `tokenizer.ggml.*` metadata (copied verbatim when the source is
a GGUF; rebuilt from `tokenizer.json` for byte-level BPE otherwise), Q/K rows re-permuted to llama.cpp's
interleaved RoPE layout (`llamalab.io.gguf.permute_qk`), norms in F32, and every 2-D weight in the requested
type, quantized by the `gguf` package's reference quantizers (bit-exact llama.cpp Q8_0/Q4_0 blocks). A
quantized llamalab directory is dequantized first, so the export re-quantizes its (already rounded) weights.
The file is written to a temporary name and renamed, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.errors import LlamalabError
from llamalab.io.gguf import GGUFFile, gguf_name, permute_qk
from llamalab.io.load import resolve
from llamalab.io.tokenizer import GPT2_SPLIT, LLAMA3_SPLIT

TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "f32": "F32"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}  # llama_ftype


def check_gguf_type(qtype: str) -> None:
    """Refuse an unknown GGUF type (before a model is loaded)."""
    if qtype.lower() not in TYPES:
        raise LlamalabError(f"unknown GGUF type {qtype!r}; use one of {', '.join(TYPES)}")


def export_gguf(llm, out: str | Path, qtype: str = "q8_0") -> Path:
    """Write the loaded model `llm` (from an alias, HF dir, quantized dir or .gguf) to `out` as a GGUF of
    type `qtype`."""
    import gguf

    check_gguf_type(qtype)
    key = qtype.lower()
    out = Path(out)
    if out.exists():
        raise LlamalabError(f"{out}: file exists; choose a new --out")
    name, cfg = llm.name, llm.config
    source = resolve(name)
    src_meta = GGUFFile(source).metadata if source.is_file() else None
    gtype = gguf.GGMLQuantizationType[TYPES[key]]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(Path(str(name)).name)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(FILE_TYPES[TYPES[key]])
        _add_rope_scaling(w, cfg.rope_scaling)
        _add_tokenizer(w, llm, src_meta)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        state = _float_state(llm.model)
        for hf, t in state.items():
            g = gguf_name(hf)
            if g is None:
                continue
            if hf.endswith("q_proj.weight"):
                t = permute_qk(t, cfg.num_attention_heads)
            elif hf.endswith("k_proj.weight"):
                t = permute_qk(t, cfg.num_key_value_heads)
            arr = t.float().contiguous().numpy()
            if arr.ndim == 1 or gtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(g, arr.astype(np.float32))
            elif gtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(g, arr.astype(np.float16))
            else:
                data = gguf.quants.quantize(arr, gtype)
                w.add_tensor(g, data, raw_shape=data.shape, raw_dtype=gtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _float_state(model) -> dict[str, torch.Tensor]:
    """HF-named float weights, quantized modules (those that stand for a weight they store in another form:
    `dequantize()`) dequantized; a tied head is not written."""
    state: dict[str, torch.Tensor] = {}
    quantized = {n: m for n, m in model.named_modules() if callable(getattr(m, "dequantize", None))}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in quantized:
            continue
        state[name] = t
    for name, m in quantized.items():
        state[name + ".weight"] = m.dequantize()
        if m.bias is not None:
            state[name + ".bias"] = m.bias
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _add_rope_scaling(w, scaling: dict[str, Any] | None) -> None:
    if not scaling:
        return
    kind = scaling.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type("linear")
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type("yarn")
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    else:
        raise LlamalabError(f"GGUF export of rope_type {kind!r} is not supported (plain, linear or yarn)")


def _add_tokenizer(w, llm, src_meta: dict[str, Any] | None) -> None:
    if src_meta is not None:  # copy the source GGUF's tokenizer exactly
        for k, v in src_meta.items():
            if k.startswith("tokenizer.") and v is not None:
                _add_kv(w, k, v)
        return
    tok = llm.tokenizer
    backend = tok.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LlamalabError(
            "GGUF export rebuilds byte-level BPE tokenizers only; export from the .gguf instead"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    types = [3 if t in added and added[t].get("special") else 4 if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(bool(tok.add_bos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer (the splits of tokenizer.py)."""
    text = json.dumps(pre or {})
    digits = '"individual_digits": true' in text
    if json.dumps(LLAMA3_SPLIT)[1:-1] in text:
        return "llama-bpe"
    if json.dumps(GPT2_SPLIT)[1:-1] in text:
        return "smollm" if digits else "gpt-2"
    return "default"


def _add_kv(w, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise LlamalabError(f"cannot write GGUF metadata {key!r} of type {type(value).__name__}")
    del gguf
