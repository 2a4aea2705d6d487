"""`llamalab convert`: any loadable model to an HF directory transformers reads back unchanged."""

from __future__ import annotations

from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.io.hf import write_hf_dir
from llamalab.io.load import load_checkpoint
from llamalab.model.build import parse_dtype
from llamalab.model_options import ModelOptions, scale_config

# rope_type values transformers' LlamaConfig understands.
HF_ROPE_TYPES = {"default", "linear", "dynamic", "yarn", "longrope", "llama3"}


def convert_to_hf(name: str, out: Path, dtype: str = "fp32", opts: ModelOptions | None = None) -> None:
    """Write `name` (alias, GGUF, HF dir) to `out` as safetensors + config.json + tokenizer files, with the
    RoPE scaling and context of `opts` saved in the config (transformers then rotates the same way)."""
    torch_dtype = parse_dtype(dtype)
    ckpt = load_checkpoint(name, dtype=torch_dtype)
    if opts is not None:
        scale_config(ckpt.config, opts)
    rope = (ckpt.config.rope_scaling or {}).get("rope_type", "default")
    if rope not in HF_ROPE_TYPES:
        raise LlamalabError(f"{name}: its RoPE scaling {rope!r} has no transformers config equivalent")
    config = ckpt.config.to_hf()
    config["torch_dtype"] = config["dtype"] = str(torch_dtype).replace("torch.", "")
    state = dict(ckpt.state_dict)
    if ckpt.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    generation = dict(ckpt.generation)
    generation["eos_token_id"] = ckpt.eos_token_ids
    if ckpt.config.bos_token_id is not None:
        generation.setdefault("bos_token_id", ckpt.config.bos_token_id)
    write_hf_dir(Path(out), config, state, ckpt.tokenizer, generation)
